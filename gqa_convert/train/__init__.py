"""Uptraining a converted model: data.py (read, hold out, tokenise, pack), backend.py (attention
kernel), schedule.py (WSD), uptrain.py (the loop, checkpoints, outputs: `uptrain(UptrainConfig)`),
commands.py (the CLI). Nothing is imported here, so that reading data (`train.data`, also used by
evaluation and calibration) does not load the training stack."""
