"""vicuna-exp: reproduce and ablate the Vicuna fine-tuning recipe.

Kept import-light on purpose: the CLI must start without torch or transformers.
"""

__version__ = "0.1.0"
