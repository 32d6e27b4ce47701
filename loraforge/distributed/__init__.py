"""Multi-process training on Hugging Face accelerate (DDP, FSDP or DeepSpeed ZeRO), with the same answer at any scale.

Two ways in, one training loop (`loraforge.training.loop.train`):

* ``loraforge train ... --num-processes N`` (``TrainConfig(num_processes=N)`` in Python) starts N
  workers on this machine the way `accelerate launch` does (`launch.py`), and hands the trained
  model back to the caller once they finish (`reload.py`).
* ``accelerate launch [--config_file cfg.yaml] -m loraforge train ...`` starts the workers itself
  (several GPUs, several nodes); `train` sees the launcher's environment and joins it.

Either way each worker runs `AccelerateRuntime` (`runtime.py`): data parallel by default, sharded
with ``--fsdp`` (`fsdp.py`) or ``--zero-stage N`` (`zero.py`), with checkpoints and adapters in the
same whole-tensor files for every engine. Whatever of accelerate, DeepSpeed, torch or transformers
is not their public API is used only through `_compat.py`. `core.plugins` imports every module here
on the first lookup of a runtime or launcher, which registers them: the trainer names none of them.
A run that is none of these (one process, not launched) gets `LocalRuntime`, which is the
plain loop: accelerate is not even imported.

Exact equivalence. Optimizer step s reads global batch s of a `BatchPlan` whose batch size is
batch_size x grad_accum x processes, so the rows of a step do not depend on how they are split.
`micro_batches` cuts them into grad_accum x processes slices; rank r takes slice k x processes + r
at accumulation step k. Every rank divides its summed token losses by the label tokens of the
whole global batch (all-reduced before the first backward) and multiplies by processes x
grad_accum, which undoes the means DDP takes over ranks and accelerate takes over accumulation
steps. The optimizer then sees (sum of token-loss gradients) / (global label tokens)
for every split: 1 x 8, 1 x 2 x 4, 2 x 4 and 2 x 2 x 2 reach the same adapter up to float rounding.
"""
