"""ModelRunner: owns the model, the KV memory and the device; turns a ScheduleBatch into
tensors, runs the forward pass and samples. Results stay on the device until processed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from schedscope.engine.batch import ScheduleBatch
from schedscope.engine.config import EngineConfig, ModelConfig
from schedscope.engine.kv_pool import KVPool, ReqToTokenPool
from schedscope.engine.model import AttentionMeta, build_model
from schedscope.engine.sampling import sample


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model_cfg.dtype)


@dataclass
class BatchResult:
    """Sampled tokens of one launched batch (one per sampling request, in batch order)."""

    next_token_ids: torch.Tensor
    host_ids: torch.Tensor | None = None  # pinned host copy in flight (CUDA)
    ready: torch.cuda.Event | None = None

    def tokens(self) -> list[int]:
        """The host sync point: waits for the forward pass when it ran asynchronously."""
        if self.ready is not None:
            self.ready.synchronize()
            assert self.host_ids is not None
            return self.host_ids.tolist()
        return self.next_token_ids.tolist()


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig) -> None:
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)  # process-wide: torch has no other scope
        self.dtype = resolve_dtype(model_cfg, self.device)
        self.model_cfg = model_cfg
        self.model = build_model(
            model_cfg,
            device=self.device,
            dtype=self.dtype,
            seed=cfg.seed,
            max_positions=cfg.context_length,
            model_path=cfg.model_path,
        )
        self.pool = KVPool(
            cfg.max_total_tokens,
            model_cfg.num_hidden_layers,
            model_cfg.num_key_value_heads,
            model_cfg.head_dim,
            self.dtype,
            self.device,
        )
        # One extra row: a chunked prefill holds a row while max_running_requests decode.
        self.req_pool = ReqToTokenPool(
            cfg.max_running_requests + 1, cfg.context_length, self.pool.pad_slot
        )
        # Latest sampled token of each request, indexed by its table row. A decode batch reads
        # its inputs here, so with overlap it can be launched before the previous batch's
        # tokens were ever copied to the host.
        self.future_tokens = torch.zeros(
            self.req_pool.num_rows, dtype=torch.int64, device=self.device
        )
        self.stream = (
            torch.cuda.Stream(self.device)
            if cfg.enable_overlap and self.device.type == "cuda"
            else None
        )

    def forward(self, batch: ScheduleBatch) -> BatchResult:
        if self.stream is None:
            return self._forward(batch)
        # On CUDA the forward runs on its own stream so the scheduler thread can prepare the
        # next batch meanwhile; the host copy is awaited only when results are processed.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            result = self._forward(batch)
            result.host_ids = result.next_token_ids.to("cpu", non_blocking=True)
            result.ready = torch.cuda.Event()
            result.ready.record(self.stream)
        return result

    def _forward(self, batch: ScheduleBatch) -> BatchResult:
        dev = self.device
        table = self.req_pool.table
        rows = torch.tensor([r.row for r in batch.reqs], dtype=torch.int64)
        if batch.mode == "decode":
            kv_lens = torch.tensor(batch.ends, dtype=torch.int64)
            positions = kv_lens - 1
            width = int(kv_lens.max())
            kv_index = table[rows, :width]
            mask = torch.arange(width)[None, :] < kv_lens[:, None]
            meta = AttentionMeta(
                out_slots=table[rows, positions].to(dev),
                decode=True,
                kv_index=kv_index.to(dev),
                kv_mask=mask[:, None, None, :].to(dev),
            )
            input_ids = self.future_tokens[rows.to(dev)]
            positions = positions.to(dev)
            logit_rows = torch.arange(len(batch.reqs), device=dev)
            sample_rows = rows.to(dev)
        else:
            ids: list[int] = []
            pos: list[int] = []
            out_slots = []
            segments = []
            logit_rows_l: list[int] = []
            for req, start, end, samples in zip(
                batch.reqs, batch.starts, batch.ends, batch.samples, strict=True
            ):
                q0 = len(ids)
                ids.extend(req.seq_ids[start:end])
                pos.extend(range(start, end))
                slots = table[req.row, :end]
                out_slots.append(slots[start:])
                mask = None
                if start:  # queries see the cached prefix plus themselves, causally
                    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
                    mask = mask.to(dev)
                segments.append((q0, end - start, slots.to(dev), mask))
                if samples:
                    logit_rows_l.append(len(ids) - 1)
            meta = AttentionMeta(
                out_slots=torch.cat(out_slots).to(dev), decode=False, segments=segments
            )
            input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
            positions = torch.tensor(pos, dtype=torch.int64, device=dev)
            logit_rows = torch.tensor(logit_rows_l, dtype=torch.int64, device=dev)
            sample_rows = torch.tensor(
                [r.row for r, s in zip(batch.reqs, batch.samples, strict=True) if s],
                dtype=torch.int64,
                device=dev,
            )
        if len(logit_rows) == 0:  # only non-final chunks: nothing to sample
            self.model(input_ids, positions, meta, self.pool.kv_caches, logit_rows)
            return BatchResult(torch.empty(0, dtype=torch.int64, device=dev))
        logits = self.model(input_ids, positions, meta, self.pool.kv_caches, logit_rows)
        sampling = [r for r, s in zip(batch.reqs, batch.samples, strict=True) if s]
        next_ids = sample(logits, [r.sampling for r in sampling], [r.generator for r in sampling])
        self.future_tokens[sample_rows] = next_ids
        return BatchResult(next_ids)
