"""`gain bench`: training and evaluation speed against the standard stack, in one process (see README.md, "Performance").

``run_bench(size, out, repeats)`` measures, on the same model, data and settings:
  training    our stage loop vs the Hugging Face Trainer (+PEFT) for gain_ffn, lora, full_ft (tokens/s, loss agreement)
  FLOPs       model FLOPs per token per method and the utilisation of the matmul peak measured in the same run
  evaluation  perplexity sweep vs lm-eval's rolling log-likelihood (identical windows), BoolQ fast path vs lm-eval
  inference   merged GAIN vs base forward time, and the unmerged wrapper's overhead
"""

from gain_cli.bench.runner import print_bench, run_bench
from gain_cli.bench.settings import SIZES, BenchSettings, bench_settings

__all__ = ["SIZES", "BenchSettings", "bench_settings", "print_bench", "run_bench"]
