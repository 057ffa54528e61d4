"""The tolerance rule (as flash-attn's tests): a kernel's error against a float64 reference must be at most
``factor`` times the error of the same reference math run in the inputs' low precision, plus a floor equal to the
rounding error of that dtype at the reference's magnitude."""
import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # |x + 0.3 - 0.3 - x| in the input dtype: one rounding step at the reference's magnitude.
    r = ref.to(dtype)
    return (r + 0.3 - 0.3 - r).abs().max().item() + 1e-6


def assert_close(out, ref64, ref_lp, factor: float, what: str, seed=None) -> None:
    err = max_err(out, ref64)
    base = max_err(ref_lp, ref64)
    floor = rounding_floor(ref64, out.dtype if out.dtype != torch.float32 else torch.float32)
    assert torch.isfinite(out).all(), f"{what}: non-finite values (seed {seed})"
    assert err <= factor * base + floor, (
        f"{what}: error {err:.3g} > {factor} x low-precision reference error {base:.3g} + floor {floor:.3g} "
        f"(seed {seed})")
