"""How far a float32 convolution on CUDA may be from the exact one, with or without TF32.

Note [TF32 tolerance]
A float32 GEMM in TF32 multiplies its operands rounded to TF32's 10 mantissa bits (the
tensor cores may truncate: a relative error in [0, 2^-10) per operand), and sums in float32.
An output element y = sum_i a_i*b_i of K terms thus errs by

    sum_i a_i*b_i*(da_i + db_i)        the operands' rounding, |da_i + db_i| < 2^-9
    + the float32 sums                 2^-24 per addition, over partial sums of up to K terms

The first part has a mean of about -2^-10*y (truncation shrinks every product) and, around it,
independent terms of scale 2^-10*|a_i*b_i|: by Hoeffding's inequality it stays within
c * 2^-9 * sqrt(sum_i (a_i*b_i)^2), except with probability 2*exp(-c^2/2). With random operands,
sqrt(sum_i (a_i*b_i)^2) is about sqrt(K) times a typical product: the sqrt(K) * 2^-10 scaling.
The tests take the exact sums from torch in float64, on the CPU, of the float32-rounded inputs:

    ref  = op(x, w)          y itself
    sq   = op(x^2, w^2)      sum_i (a_i*b_i)^2 per element (and for a gradient, the same
                             backward pass with the cotangent squared: sum (g_i*w_i)^2)
    n    = op(1, 1)          K, the number of terms per element

and allow, per element,

    TF32:  2^-9*|ref| + 7 * 2^-9 * sqrt(sq) + IEEE's allowance   (c = 7: 5e-11 per element)
    IEEE:  8 * 2^-24 * sqrt(n) * sqrt(sq) + 2^-23*|ref|

A GEMM that dropped, doubled or misplaced one product is off by |a_i*b_i|, which is a few
times 2^-9*sqrt(K) typical products at the sizes these tests use, so the TF32 bound still
catches it, and the IEEE bound catches it by orders of magnitude. TF32 can also be seen to
run: its error relative to sqrt(sq) reaches about 2^-11 on some element of any output of a
few dozen elements, while IEEE float32's stays under 8 * 2^-24 * sqrt(K) < 2^-13 for every K
up to 2^18 (tf32_was_used).
"""
import torch

TF32_UNIT = 2.0**-10
F32_UNIT = 2.0**-24


def allowed_error(ref, sq, n, tf32):
    """The per-element allowance of Note [TF32 tolerance] (float64 tensors of ref's shape)."""
    root = sq.clamp(min=0).sqrt()
    tol = 8 * F32_UNIT * n.clamp(min=1).sqrt() * root + 2 * F32_UNIT * ref.abs()
    if tf32:
        tol = tol + 2 * TF32_UNIT * ref.abs() + 7 * 2 * TF32_UNIT * root
    return tol + 1e-30


def check_within(got, ref, sq, n, tf32, what=""):
    """got (any device, float32) against the float64 reference, element by element."""
    got = got.detach().double().cpu()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(got).all(), what
    excess = (got - ref).abs() / allowed_error(ref, sq, n, tf32)
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 1, f"{what}: error {worst:.3g} times the {'TF32' if tf32 else 'IEEE'} allowance"


def relative_error(got, ref, sq):
    """max |got - ref| / sqrt(sq) over the elements whose sq is not zero."""
    got = got.detach().double().cpu()
    root = sq.clamp(min=0).sqrt()
    mask = root > 0
    return ((got - ref).abs()[mask] / root[mask]).max().item() if mask.any() else 0.0


def tf32_was_used(errors):
    """Whether the relative_error values of a case's outputs show TF32's rounding."""
    return max(errors) > 2.0**-13


def reference(fn, inputs, cotangent):
    """fn's output and its gradients with respect to every input, in float64 on the CPU, with the
    Note's sq and n for each: a list of (ref, sq, n) for [output, *input gradients]. `inputs` and
    `cotangent` are float64 CPU tensors holding float32 values; fn must be linear in each input
    separately (a convolution of x and w, plus a bias)."""
    def run(args, g):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, g)
        return [y.detach()] + [t.detach() for t in grads]

    ref = run(inputs, cotangent)
    sq = run([a * a for a in inputs], cotangent * cotangent)
    n = run([torch.ones_like(a) for a in inputs], torch.ones_like(cotangent))
    return list(zip(ref, sq, n))


def round_to_tf32(t):
    """t (float32) with its low 13 mantissa bits cleared: TF32 by truncation, for the CPU tests of
    the bounds themselves."""
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
