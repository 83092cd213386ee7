"""tiny: a ~0.8M-parameter byte-level Llama on the Python standard library's sources.

The default recipe: trains in about a minute on 2 CPU cores with a clearly falling loss.

    efficient-train train --config configs/tiny.py --workdir runs/tiny
"""
from efficient_train.config import default_config


def get_config():
    return default_config()
