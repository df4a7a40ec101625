"""AW-convolution as functions: its three computation paths and the chunked path's autograd
Function.

Zhu, Hofstee, Lee, Al-Ars, "An Attention Module for Convolutional Neural Networks",
ICANN 2021, arXiv:2108.08205, F2 with Pointconv2 written out:

    A_n = V H_n + b                       (C_out * C_in/g, kh * kw), Pointconv2 as a matmul
    W_n = K * (1 + A_n)                   the residual edge
    O_n = conv2d(x_n, W_n)

* :func:`aw_conv2d_grouped`: the whole batch folded into the conv groups, one conv call for all
  per-sample kernels, differentiated by plain autograd (which stores every kernel).
* :func:`aw_conv2d_unfold`: im2col + batched matmul with no batch size baked into any op, so
  ONNX and ``torch.export`` graphs keep a dynamic batch.
* :func:`aw_conv2d` (chunked): the per-sample kernels W_n are N times the size of K; at deep
  ResNet shapes they are far larger than the activations, so every full pass over them is
  memory-bound. It builds W_n for a chunk of samples right before that chunk's (grouped) conv,
  while it is still in cache, never stores them, and builds them again in backward. Autograd
  keeps only ``x``, the hidden ``H`` (N x R x kh x kw) and the parameters.

Mixed precision: under ``torch.autocast`` (any device type) the kernels are built and
convolved in the autocast dtype; the chunked backward sums parameter gradients over the batch
in float32. Double backward: the grouped and unfold paths are plain autograd; the chunked
backward, when autograd records it (``create_graph=True``), differentiates the grouped
formulation again, so second-order gradients are exact (and cost the grouped path's memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnconv.functional._common import accumulate_dtype, cast, compute_dtype, recompute_backward

#: On CPU the whole batch is one chunk while all its kernels fit well inside the last-level
#: cache (32 MiB L3 on the 2-core EPYC measured); otherwise chunks of at most CPU_CHUNK_BYTES
#: (the 2 x 1 MiB L2). Measured there: at (32, 256, 14, 14) (2.4 MB per sample) chunks of 1 ran
#: fastest, 2 and 4 5-15% slower, 8+ 30%+ slower; at (32, 64, 56, 56) (0.15 MB per sample) all
#: chunk sizes ran alike in one thread, and under load with 2 threads fewer calls ran faster.
CPU_BATCH_BYTES = 8 << 20
CPU_CHUNK_BYTES = 2 << 20

Pair = tuple[int, int]


def default_chunk_size(batch: int, weight: torch.Tensor) -> int:
    """Samples per chunk: the whole batch on GPUs (one grouped conv), else what fits in cache."""
    per_sample = weight.numel() * weight.element_size()
    if weight.device.type != "cpu" or batch * per_sample <= CPU_BATCH_BYTES:
        return max(batch, 1)
    return max(1, min(batch, CPU_CHUNK_BYTES // per_sample))


def aw_kernels(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """W_n = K * (1 + A_n) (F2) for attention ``attn`` (N, *weight.shape), in the compute
    dtype (autocast's, else the attention's)."""
    dtype = compute_dtype(attn)
    weight = cast(weight, dtype)
    return torch.addcmul(weight, weight, cast(attn, dtype))


def aw_conv2d_grouped(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None,
                      stride: Pair, padding: Pair | str, dilation: Pair,
                      groups: int) -> torch.Tensor:
    """``conv2d(x_n, kernels_n)`` for every n as one conv whose groups hold the batch."""
    n, c_in = x.shape[:2]
    c_out = kernels.shape[1]
    dtype = kernels.dtype
    out = F.conv2d(cast(x, dtype).reshape(1, n * c_in, *x.shape[2:]),
                   kernels.reshape(n * c_out, *kernels.shape[2:]),
                   None if bias is None else cast(bias, dtype).repeat(n), stride, padding,
                   dilation, n * groups)
    return out.view(n, c_out, *out.shape[2:])


def aw_conv2d_unfold(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None,
                     stride: Pair, dilation: Pair, groups: int) -> torch.Tensor:
    """``conv2d(x_n, kernels_n)`` as im2col + batched matmul (``x`` already padded)."""
    n, _, height, width = x.shape
    c_out, _, kh, kw = kernels.shape[1:]
    (sh, sw), (dh, dw) = stride, dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    dtype = kernels.dtype
    cols = F.unfold(cast(x, dtype), (kh, kw), dilation=dilation, stride=stride)
    # unfold orders rows channel-major, so each group's C_in/g * kh * kw rows are contiguous.
    cols = cols.reshape(n, groups, -1, out_h * out_w)
    out = torch.matmul(kernels.reshape(n, groups, c_out // groups, -1), cols)
    out = out.reshape(n, c_out, out_h, out_w)
    if bias is not None:
        out = out + cast(bias, dtype).view(1, -1, 1, 1)
    return out


def aw_conv2d(
    x: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    attn_weight: torch.Tensor,
    attn_bias: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``conv2d(x_n, K * (1 + V H_n + b))`` for every sample n, chunk by chunk (AW, F2).

    Args:
        x: input (N, C_in, H, W), already padded for non-zero padding modes.
        hidden: ``relu(Pointconv1(avgpool(x)))`` of shape (N, R, kh, kw).
        weight: the conv weight K (C_out, C_in/groups, kh, kw).
        attn_weight: Pointconv2's weight V, (C_out * C_in/groups, R) or (..., R, 1, 1).
        attn_bias: Pointconv2's bias b, (C_out * C_in/groups,).
        bias, stride, padding, dilation, groups: as for ``F.conv2d`` (padding as two ints).
        chunk_size: samples whose kernels are built and convolved together;
            ``None`` picks :func:`default_chunk_size`. It never changes the result.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight)
    if chunk_size < 1:
        raise ValueError(f"aw_conv2d: chunk_size must be a positive integer, got {chunk_size}")
    # The Function gets every tensor in the compute dtype already (the casts are recorded by
    # autograd, which casts the gradients back), so its forward and backward never depend on
    # the autocast state, which differs between forward and backward time.
    dtype = compute_dtype(x)
    attn_weight = attn_weight.reshape(attn_weight.shape[0], attn_weight.shape[1])
    tensors = [cast(t, dtype) for t in (x, hidden, weight, attn_weight, attn_bias, bias)]
    return _AWConv2dFunction.apply(*tensors, tuple(stride), tuple(padding), tuple(dilation),
                                   groups, chunk_size)


def aw_conv2d_reference(x: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        attn_weight: torch.Tensor, attn_bias: torch.Tensor,
                        bias: torch.Tensor | None, stride: Pair, padding: Pair,
                        dilation: Pair, groups: int) -> torch.Tensor:
    """:func:`aw_conv2d` by plain autograd ops (all kernels at once): its double backward."""
    n = x.shape[0]
    hidden_t = hidden.reshape(n, hidden.shape[1], -1)
    attn = torch.matmul(attn_weight, hidden_t) + attn_bias.view(1, -1, 1)
    kernels = weight + weight * attn.view(n, *weight.shape)
    return aw_conv2d_grouped(x, kernels, bias, stride, padding, dilation, groups)


def _chunk_kernels(hidden: torch.Tensor, weight: torch.Tensor, attn_weight: torch.Tensor,
                   attn_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, K * (1 + A)) of a chunk, both (c, Q, T); hidden is (c, R, T), weight (Q, T)."""
    if hidden.shape[0] == 1:
        attn = torch.addmm(attn_bias.unsqueeze(1), attn_weight, hidden[0]).unsqueeze(0)
    else:
        attn = torch.baddbmm(attn_bias.view(1, -1, 1),
                             attn_weight.expand(hidden.shape[0], -1, -1), hidden)
    return attn, torch.addcmul(weight, weight, attn)


class _AWConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                attn_weight: torch.Tensor, attn_bias: torch.Tensor, bias: torch.Tensor | None,
                stride: Pair, padding: Pair, dilation: Pair, groups: int,
                chunk_size: int) -> torch.Tensor:
        n = x.shape[0]
        c_out = weight.shape[0]
        hidden_t = hidden.reshape(n, hidden.shape[1], -1)
        weight_qt = weight.reshape(-1, hidden_t.shape[2])
        outs = []
        for start in range(0, n, chunk_size):
            xc = x[start:start + chunk_size]
            c = xc.shape[0]
            _, kernels = _chunk_kernels(hidden_t[start:start + c], weight_qt, attn_weight,
                                        attn_bias)
            out = F.conv2d(
                xc.reshape(1, -1, *xc.shape[2:]), kernels.view(c * c_out, *weight.shape[1:]),
                None if bias is None else bias.repeat(c), stride, padding, dilation, c * groups)
            outs.append(out.view(c, c_out, *out.shape[2:]))
        ctx.save_for_backward(x, hidden, weight, attn_weight, attn_bias, bias)
        ctx.conv_args = (stride, padding, dilation, groups, chunk_size)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, hidden, weight, attn_weight, attn_bias, bias = ctx.saved_tensors
        stride, padding, dilation, groups, chunk_size = ctx.conv_args
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            grads = recompute_backward(
                ctx.needs_input_grad[:6],
                lambda *t: aw_conv2d_reference(*t, stride, padding, dilation, groups),
                (x, hidden, weight, attn_weight, attn_bias, bias), grad_out)
            return (*grads, None, None, None, None, None)
        return (*_aw_conv2d_backward(ctx.needs_input_grad[:6], grad_out, x, hidden, weight,
                                     attn_weight, attn_bias, bias, stride, padding, dilation,
                                     groups, chunk_size),
                None, None, None, None, None)


def _aw_conv2d_backward(needs, grad_out, x, hidden, weight, attn_weight, attn_bias, bias,
                        stride, padding, dilation, groups, chunk_size):
    """First-order gradients of :func:`aw_conv2d`, rebuilding each chunk's kernels."""
    need_x, need_hidden, need_k, need_v, need_b, need_bias = needs
    n, c_out = x.shape[0], weight.shape[0]
    hidden_t = hidden.reshape(n, hidden.shape[1], -1)
    weight_qt = weight.reshape(-1, hidden_t.shape[2])
    acc = accumulate_dtype(weight.dtype)
    need_attn = need_hidden or need_v or need_b
    need_kernel_grad = need_k or need_attn
    grad_x = torch.empty_like(x) if need_x and chunk_size < n else None
    need_bias = need_bias and bias is not None
    grad_bias = grad_out.new_zeros(c_out, dtype=acc) if need_bias else None
    grad_hidden = torch.empty_like(hidden_t) if need_hidden else None
    # With G_n = dL/dW_n: grad_K = sum_n G_n + sum_n G_n * A_n and grad_b = sum_t K sum_n G_n,
    # so only two (Q, T) sums run over the batch.
    grad_sum = torch.zeros_like(weight_qt, dtype=acc) if need_k or need_b else None
    grad_attn_part = torch.zeros_like(weight_qt, dtype=acc) if need_k else None
    # Accumulated transposed: (R, T) @ (T, Q) is a fast GEMM shape, (Q, T) @ (T, R) is not.
    grad_v_t = attn_weight.new_zeros(attn_weight.t().shape, dtype=acc) if need_v else None
    for start in range(0, n, chunk_size):
        xc = x[start:start + chunk_size]
        c = xc.shape[0]
        hc = hidden_t[start:start + c]
        attn, kernels = _chunk_kernels(hc, weight_qt, attn_weight, attn_bias)
        go = grad_out[start:start + c]
        gx, gw, gbias = torch.ops.aten.convolution_backward(
            go.reshape(1, -1, *go.shape[2:]), xc.reshape(1, -1, *xc.shape[2:]),
            kernels.view(c * c_out, *weight.shape[1:]), [c * c_out], stride, padding,
            dilation, False, (0, 0), c * groups, (need_x, need_kernel_grad, need_bias))
        if need_x:
            if c == n:  # a single chunk: no copy of the (large) input gradient
                grad_x = gx.view(x.shape)
            else:
                grad_x[start:start + c] = gx.view(c, *x.shape[1:])
        if need_bias:
            grad_bias += gbias.view(c, c_out).sum(0)
        if not need_kernel_grad:
            continue
        gw = gw.view(c, *weight_qt.shape)
        if grad_sum is not None:
            grad_sum += gw[0] if c == 1 else gw.sum(0)
        if need_k:
            grad_attn_part += gw[0] * attn[0] if c == 1 else (gw * attn).sum(0)
        if need_hidden or need_v:
            grad_attn = gw * weight_qt  # dL/dA_n = G_n * K
            if need_hidden:
                grad_hidden[start:start + c] = torch.matmul(attn_weight.t(), grad_attn)
            if need_v:
                for j in range(c):
                    if acc == grad_attn.dtype:
                        grad_v_t.addmm_(hc[j], grad_attn[j].t())
                    else:  # addmm_ takes one dtype; the GEMM still runs in fp16/bf16
                        grad_v_t += torch.mm(hc[j], grad_attn[j].t())
    grad_k = (grad_sum + grad_attn_part).to(weight.dtype).view_as(weight) if need_k else None
    grad_b = (grad_sum * weight_qt).sum(1).to(attn_bias.dtype) if need_b else None
    return (grad_x,
            None if grad_hidden is None else grad_hidden.view(hidden.shape),
            grad_k,
            None if grad_v_t is None else grad_v_t.t().to(attn_weight.dtype).contiguous(),
            grad_b,
            None if grad_bias is None else grad_bias.to(bias.dtype))
