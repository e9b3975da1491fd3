"""Uptraining a converted model: data.py (read, hold out, tokenise, pack), backend.py (attention
kernel), schedule.py (WSD), uptrain.py (the loop, checkpoints, outputs), commands.py (the CLI)."""

from .uptrain import UptrainConfig, UptrainResult, uptrain

__all__ = ["UptrainConfig", "UptrainResult", "uptrain"]
