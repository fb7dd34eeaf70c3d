"""gain: continual-adaptation experiment runner.

Adapt a pretrained causal LM to a sequence of text domains, one stage after another,
with GAIN (diagonal gain modulation), LoRA, full fine-tuning, (IA)^3 or IMSM, and
measure what every stage does to every domain (forgetting matrices).
"""

__version__ = "0.1.0"

import warnings as _warnings

# PEFT calls a transformers-5 API that warns on every LoRA attach; it is not ours to fix and only adds noise.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
