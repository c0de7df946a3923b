"""Context parallelism: each rank of the ``cp`` mesh dimension holds part of every sequence.

torch's built-in ``context_parallel`` has no CPU attention handler (its ring handlers are registered for the CUDA
attention kernels only), so both attention cores are written here against plain process groups:

- ``ring``: every rank keeps its queries; K/V blocks travel around the ring (batch_isend_irecv) and the partial
  results are merged with a running log-sum-exp. The backward is an explicit loop in the same autograd Function
  (dK/dV accumulators travel with the K/V blocks), so no rank can leave a P2P op out of its backward graph.
- ``ulysses``: an all_to_all swaps the sequence split for a head split, every rank runs full causal attention on
  its heads, and a second all_to_all swaps back. Needs the (per tp rank) head count divisible by cp.

Sequence layout: the sequence is cut into 2*cp equal chunks. With ``load_balance`` rank r holds chunks r and
2*cp-1-r (an early and a late chunk, so under causal masking every rank does the same work); otherwise chunks
2r and 2r+1. ``shard_sequence`` and ``apply_cp`` must use the same layout.

Gloo silently corrupts non-contiguous buffers (SDPA's permuted gradients gave wrong K/V gradients, no error): every
buffer handed to a collective here is made contiguous first, and receive buffers are fresh contiguous tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from orchestrate.parallel.mesh import ParallelConfigError
from orchestrate.parallel.model_parts import ModelParts

CP_IMPLS = ("ring", "ulysses")


# ---------------------------------------------------------------------------------------------- sequence layout

def chunk_ids(cp_rank: int, cp: int, load_balance: bool = True) -> tuple[int, int]:
    """The two chunks (of 2*cp) that ``cp_rank`` holds, in the order it holds them."""
    return (cp_rank, 2 * cp - 1 - cp_rank) if load_balance else (2 * cp_rank, 2 * cp_rank + 1)


def sequence_positions(seq_len: int, cp_rank: int, cp: int, load_balance: bool = True) -> torch.Tensor:
    """Absolute positions [seq_len / cp] of the tokens ``cp_rank`` holds."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunk_ids(cp_rank, cp, load_balance)])


def shard_sequence(tokens: torch.Tensor, targets: torch.Tensor, cp_rank: int, cp: int, load_balance: bool = True):
    """This rank's part of a [B, T] batch: (tokens, targets, positions); pass positions to the model's forward."""
    positions = sequence_positions(tokens.shape[1], cp_rank, cp, load_balance)
    return tokens[:, positions], targets[:, positions], positions


def validate_cp(seq_len: int, n_heads: int, cp: int, impl: str, tp: int = 1) -> None:
    """Raise ParallelConfigError (a ValueError) naming the key when this layout cannot run."""
    if impl not in CP_IMPLS:
        raise ParallelConfigError(f"parallel.cp_impl={impl}: unknown (valid: {', '.join(CP_IMPLS)})")
    if cp < 1:
        raise ParallelConfigError(f"parallel.cp={cp}: must be a positive integer")
    if seq_len % (2 * cp):
        valid = [d for d in range(1, seq_len // 2 + 1) if seq_len % (2 * d) == 0]
        raise ParallelConfigError(
            f"train.seq_len={seq_len}: must be divisible by 2*parallel.cp={2 * cp} (each rank holds 2 of 2*cp "
            f"equal chunks) (valid parallel.cp: {', '.join(map(str, valid))})"
        )
    local_heads = n_heads // tp
    if impl == "ulysses" and local_heads % cp:
        valid = [d for d in range(1, local_heads + 1) if local_heads % d == 0]
        raise ParallelConfigError(
            f"parallel.cp={cp}: ulysses needs the heads per tp rank (model.n_heads={n_heads} / parallel.tp={tp} "
            f"= {local_heads}) divisible by cp (valid: {', '.join(map(str, valid))})"
        )


# ---------------------------------------------------------------------------------------------- attention blocks

# SDPA's CPU flash kernels are called directly because the public API returns no log-sum-exp; they keep memory
# linear in the block length (no [Tq, Tk] score matrix is stored).
def _block_forward(q, k, v, causal: bool):
    """Attention of one query block over one key block: (out [B,H,Tq,D], log-sum-exp [B,H,Tq])."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]
    return out, lse


def _block_backward(grad_out, q, k, v, out, lse, causal: bool):
    """(dq, dk, dv) of one block, given the FINAL (merged) out and lse: the flash backward recomputes
    P = exp(S - lse) and uses rowsum(dO * out), so each block's share of the full softmax comes out exactly."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal)


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalised partial results over disjoint key sets (running log-sum-exp)."""
    new_lse = torch.logaddexp(lse, block_lse)
    old_weight, block_weight = torch.exp(lse - new_lse).unsqueeze(-1), torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out * old_weight + block_out * block_weight, new_lse


def _visible_blocks(rank: int, source: int, size: int, load_balance: bool):
    """(query chunk index, key chunk index, causal) for every pair of this rank's query chunks and the K/V chunks
    of ``source`` in which some query sees some key: earlier key chunks fully, its own chunk causally."""
    for qi, q_chunk in enumerate(chunk_ids(rank, size, load_balance)):
        for ki, k_chunk in enumerate(chunk_ids(source, size, load_balance)):
            if k_chunk <= q_chunk:
                yield qi, ki, k_chunk == q_chunk


# ---------------------------------------------------------------------------------------------- ring attention

def _ring_shift(send: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Start sending ``send`` to the next rank of the ring and receiving the previous rank's into a new buffer."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    send = send.contiguous()
    recv = torch.empty_like(send, memory_format=torch.contiguous_format)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % size),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % size)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _two_chunks(x: torch.Tensor) -> torch.Tensor:
    """[B, H, Tl, D] -> contiguous [2, B, H, Tl/2, D]: the two sequence chunks a rank holds."""
    return torch.stack(x.chunk(2, dim=2))


def _join_chunks(chunks) -> torch.Tensor:
    return torch.cat(list(chunks), dim=2)


class _RingAttention(torch.autograd.Function):
    """Causal attention of local q [B,H,Tl,D] over the whole sequence, whose K/V are spread over ``group``."""

    @staticmethod
    def forward(ctx, q, k, v, group, load_balance: bool):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        q_chunks = _two_chunks(q)
        outs = [torch.zeros_like(c, dtype=torch.float32) for c in q_chunks]
        lses = [torch.full(c.shape[:-1], float("-inf"), dtype=torch.float32) for c in q_chunks]
        kv = torch.stack([_two_chunks(k), _two_chunks(v)])  # [2 (k, v), 2 (chunks), B, H, Tl/2, D]
        for step in range(size):
            if step + 1 < size:
                next_kv, requests = _ring_shift(kv, group)
            for qi, ki, causal in _visible_blocks(rank, (rank - step) % size, size, load_balance):
                block_out, block_lse = _block_forward(q_chunks[qi], kv[0, ki], kv[1, ki], causal)
                outs[qi], lses[qi] = _merge(outs[qi], lses[qi], block_out.float(), block_lse.float())
            if step + 1 < size:
                _wait(requests)
                kv = next_kv
        out = _join_chunks(outs).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, _join_chunks(lses))
        ctx.group, ctx.load_balance = group, load_balance
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, load_balance = ctx.group, ctx.load_balance
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        q_chunks, grad_chunks, out_chunks, lse_chunks = (_two_chunks(t) for t in (q, grad_out, out, lse))
        grad_q = torch.zeros_like(q_chunks, dtype=torch.float32)
        kv = torch.stack([_two_chunks(k), _two_chunks(v)])
        # The dK/dV accumulator of a K/V block travels with it; after `size` shifts it is back at its owner.
        grad_kv = torch.zeros_like(kv, dtype=torch.float32)
        for step in range(size):
            if step + 1 < size:
                next_kv, requests = _ring_shift(kv, group)
            for qi, ki, causal in _visible_blocks(rank, (rank - step) % size, size, load_balance):
                dq, dk, dv = _block_backward(grad_chunks[qi], q_chunks[qi], kv[0, ki], kv[1, ki],
                                             out_chunks[qi], lse_chunks[qi], causal)
                grad_q[qi] += dq
                grad_kv[0, ki] += dk
                grad_kv[1, ki] += dv
            if step + 1 < size:  # one shift in flight per peer at a time: no reliance on message ordering
                _wait(requests)
                kv = next_kv
            grad_kv, grad_requests = _ring_shift(grad_kv, group)
            _wait(grad_requests)
        grad_k, grad_v = (_join_chunks(g).to(k.dtype) for g in grad_kv)
        return _join_chunks(grad_q).to(q.dtype), grad_k, grad_v, None, None


# ---------------------------------------------------------------------------------------------- ulysses

def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[N, H, Tl, D] (all heads, this rank's sequence part) -> [N, H/cp, cp*Tl, D] (head group `rank`, the
    sequence parts of all ranks in rank order)."""
    size = dist.get_world_size(group)
    n, heads, seq, dim = x.shape
    send = x.reshape(n, size, heads // size, seq, dim).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(n, heads // size, size * seq, dim)


def _heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``_sequence_to_heads``."""
    size = dist.get_world_size(group)
    n, heads, seq, dim = x.shape
    send = x.reshape(n, heads, size, seq // size, dim).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(n, size * heads, seq // size, dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable sequence<->head re-sharding; the gradient takes the inverse all_to_all."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return _sequence_to_heads(x, group) if to_heads else _heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        inverse = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return inverse(grad, ctx.group), None, None


def _ulysses_attention(q, k, v, group, load_balance: bool):
    size = dist.get_world_size(group)
    batch, seq = q.shape[0], q.shape[2]
    qkv = _AllToAll.apply(torch.cat([q, k, v]), group, True)
    # The gathered sequence is in rank order; causal attention needs it in position order.
    gathered_positions = torch.cat([sequence_positions(seq * size, r, size, load_balance) for r in range(size)])
    order = torch.argsort(gathered_positions)
    qkv = qkv.index_select(2, order)
    q, k, v = qkv.split(batch)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.index_select(2, torch.argsort(order))
    return _AllToAll.apply(out, group, False)


# ---------------------------------------------------------------------------------------------- installing

def build_attention_core(impl: str, group, load_balance: bool = True):
    """An ``AttentionCore`` (q, k, v [B, H, T/cp, D] -> [B, H, T/cp, D]) for the cp process group."""
    if impl == "ring":
        return lambda q, k, v: _RingAttention.apply(q, k, v, group, load_balance)
    if impl == "ulysses":
        return lambda q, k, v: _ulysses_attention(q, k, v, group, load_balance)
    raise ParallelConfigError(f"parallel.cp_impl={impl}: unknown (valid: {', '.join(CP_IMPLS)})")


def apply_cp(model: nn.Module, parts: ModelParts, cp_mesh: DeviceMesh, impl: str,
             load_balance: bool = True) -> nn.Module:
    """Install the context-parallel attention core in the attention of every block of ``model`` (in place;
    returns it); ``parts`` says where a block's attention is.

    ``cp_mesh`` is the 1-D ``mesh["cp"]``. Composes with ``apply_tp`` in either order: the core sees the heads
    of this tp rank. A cp degree of 1 leaves the model unchanged.
    """
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs the 1-D cp mesh (mesh['cp']), got dims {cp_mesh.mesh_dim_names}")
    if cp_mesh.size() == 1:
        return model
    core = build_attention_core(impl, cp_mesh.get_group(), load_balance)
    for attention in parts.attentions(model):
        attention.attention_core = core
    return model


def bind_sequence_positions(model: nn.Module, seq_len: int, cp_rank: int, cp: int,
                            load_balance: bool = True) -> nn.Module:
    """Make ``model`` (e.g. a pipeline stage, which a schedule calls with hidden states only) default to the
    absolute positions of this cp rank's part of a ``seq_len`` sequence. Prepended, so sequence parallelism's
    own position default (parallel/tensor.py) sees them and steps aside. A cp degree of 1 changes nothing."""
    if cp == 1:
        return model
    positions = sequence_positions(seq_len, cp_rank, cp, load_balance)

    def hook(module, args, kwargs):
        if len(args) > 1 or kwargs.get("positions") is not None:
            return None
        return args, {**kwargs, "positions": positions.to(args[0].device)}

    model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return model
