"""gqa-convert: regroup a pretrained model's KV heads into the cost-optimal GQA configuration,
uptrain it, verify it against the GQA scaling law and publish it."""

__version__ = "0.1.0"
