"""vicuna-exp: reproduce and ablate the Vicuna fine-tuning recipe.

Kept import-light on purpose: the CLI must start without torch or transformers.

One logging filter is installed here, before anything can import bitsandbytes (peft imports it
whenever it is installed, for `lora` as well as `qlora`): on a CPU with AVX512-BF16, bitsandbytes
0.50 warns at import that the optional `kernels` package is missing. That kernel only speeds up
4-bit inference on the CPU, a path the trainer switches off (`vicuna_exp.quantize`), so the
warning would only mislead.
"""

import logging as _logging

__version__ = "0.1.0"

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward"


class _DropOptionalKernelWarning(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_WARNING)


_logging.getLogger(BNB_CPU_LOGGER).addFilter(_DropOptionalKernelWarning())
