"""`gain bench`: training and evaluation speed against the standard stack, in one process (see docs/performance.md).

``run_bench(size, out, repeats)`` measures, on the same model, data and settings:
  training    our stage loop vs the Hugging Face Trainer (+PEFT) for gain_ffn, lora, full_ft (tokens/s, loss agreement)
  FLOPs       model FLOPs per token per method and the utilisation of the matmul peak measured in the same run
  evaluation  perplexity sweep vs lm-eval's rolling log-likelihood (identical windows), BoolQ fast path vs lm-eval
  inference   merged GAIN vs base forward time, and the unmerged wrapper's overhead
  threads     forward time per OpenMP wait policy and thread count; training and perplexity on a busy machine
              (synthetic load the bench starts and stops), the old fixed setting vs the adaptive one
  default     one whole long stage with train.compile=auto vs the Trainer's default (``--section default``)
``gain bench --runs RUN ...`` (``end_to_end``): where whole runs' time went, and their end-to-end MFU.
"""

from gain_cli.bench.runner import SECTIONS, print_bench, run_bench, run_section
from gain_cli.bench.settings import SIZES, BenchSettings, bench_settings

__all__ = ["SECTIONS", "SIZES", "BenchSettings", "bench_settings", "print_bench", "run_bench", "run_section"]
