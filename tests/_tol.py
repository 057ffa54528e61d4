"""The tolerance rule (as flash-attn's tests): a kernel's error against a float64 reference must be at most
``factor`` times the error of the same reference math run in the inputs' low precision, plus a floor equal to the
rounding error of that dtype at the reference's magnitude."""
import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # |x + 0.3 - 0.3 - x| in the input dtype: one rounding step at the reference's magnitude.
    r = ref.to(dtype)
    # 16 fp32 ulp on top, for any input dtype: where the exact gradient cancels to 0 (one visible key: dS =
    # P (dP - delta) with P = 1), dP = dO.V and FA2's delta = rowsum(dO * O) are two fp32 sums of the same terms in
    # different orders; the exactly cancelling reference has no such noise (fuzz: dq 1.6e-6 fp16 on CPU, 1.07e-6
    # fp32 on H100, reference error 0).
    floor = (r + 0.3 - 0.3 - r).abs().max().item() + 1e-6 + 16 * torch.finfo(torch.float32).eps
    if dtype == torch.float32:
        # fp32 inputs: the GPU kernels use the hardware's approximate exp2 (2 ulp) and fold the scale into the
        # exponent, so a few ulp of the output's magnitude on top (seen on H100: 1.5e-6 on dq of max ~3, where
        # cuBLAS-fp32's own error was 1.5e-7). 16 ulp of the largest value bounds it.
        floor += 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    return floor


def assert_close(out, ref64, ref_lp, factor: float, what: str, seed=None) -> None:
    err = max_err(out, ref64)
    base = max_err(ref_lp, ref64)
    floor = rounding_floor(ref64, out.dtype)
    assert torch.isfinite(out).all(), f"{what}: non-finite values (seed {seed})"
    assert err <= factor * base + floor, (
        f"{what}: error {err:.3g} > {factor} x low-precision reference error {base:.3g} + floor {floor:.3g} "
        f"(seed {seed})")
