"""Training: photo data, tiny-ae, PiD teacher (flow matching), DMD2 distillation; torchrun-ready.

Entry points: `pidserve data photos`, `pidserve train autoencoder|teacher|distill`.
"""
