"""The scheduler: waiting queue → (chunked) prefill → continuous decode, under a KV budget.

One ``step()`` forms at most one batch: a prefill batch when requests wait and fit (SGLang's
prefill-first policy), else one decode step of every running request. When decode runs out of
KV, the requests that made the least progress are retracted to the waiting queue; they come
back with their prompt and outputs so far as the new prefill (cached pages make that cheap).

Telemetry goes only through the emitter; every event is built behind ``emitter.enabled``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from schedscope.engine.batch import ScheduleBatch
from schedscope.engine.config import EngineConfig, ModelConfig
from schedscope.engine.emitter import AnyEmitter
from schedscope.engine.model_runner import BatchResult, ModelRunner
from schedscope.engine.radix_cache import RadixCache
from schedscope.engine.request import (
    FINISH_ABORT,
    GenerationResult,
    Req,
    ReqStatus,
    RequestOutput,
)
from schedscope.engine.tokenizer import ByteTokenizer
from schedscope.telemetry.schema import (
    MODE_DECODE,
    MODE_PREFILL,
    BatchDone,
    BatchLaunched,
    DecodeStats,
    KvEvents,
    KvLoad,
    PrefillStats,
    ReqAborted,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
    ReqRetracted,
)

_now_ns = time.monotonic_ns


class Scheduler:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, emitter: AnyEmitter) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.emitter = emitter
        self.runner = ModelRunner(cfg, model_cfg)
        self.pool = self.runner.pool
        self.req_pool = self.runner.req_pool
        self.tree = (
            RadixCache(self.pool, cfg.page_size, record_events=emitter.enabled)
            if cfg.enable_radix_cache
            else None
        )
        self.tokenizer = ByteTokenizer()
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self.reqs: dict[str, Req] = {}  # every live request, by rid
        self.forward_ct = 0
        self.inflight: tuple[ScheduleBatch, BatchResult] | None = None  # overlap: batch N
        self.new_token_ratio = cfg.init_new_token_ratio
        # Called on the scheduler thread when a request ends (the Engine keeps results).
        self.on_finish: list[Callable[[GenerationResult, Req], object]] = []
        # Set by the control plane's pause_generation (engine/control.py): no batch runs.
        self.paused: str | None = None
        # gen_throughput as SGLang's decode log computes it: tokens over a window of
        # decode_log_interval decode batches; the last value is carried between windows.
        self.last_gen_throughput = 0.0
        self._window_tokens = 0
        self._window_batches = 0
        self._window_start_ns: int | None = None
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        self._next_kv_load_ns = 0

    # -- inputs -----------------------------------------------------------------------------

    def add_request(self, req: Req) -> None:
        if req.rid in self.reqs:
            self._emit_abort(req, f"duplicate rid {req.rid!r}")
            return
        if not req.sampling.greedy:
            gen = torch.Generator(device=self.runner.device)
            req.generator = gen.manual_seed(req.sampling.seed or 0)
        req.fill_len = len(req.prompt_ids)
        self.reqs[req.rid] = req
        self.waiting.append(req)
        if self.emitter.enabled:
            self.emitter.emit(
                ReqQueued(
                    req.queued_ns,
                    req.rid,
                    len(req.prompt_ids),
                    req.sampling.max_new_tokens,
                    req.traceparent,
                    req.tracestate,
                )
            )

    def abort(self, rid: str, reason: str = "aborted by client") -> bool:
        req = self.reqs.get(rid)
        if req is None:
            return False
        if req.status is ReqStatus.WAITING:
            self.waiting.remove(req)
            self.finish(req, FINISH_ABORT, reason)
        else:  # holds KV and may be in flight: finished when its next result is processed
            req.abort_requested = reason
        return True

    # -- the loop ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.inflight)

    def step(self) -> bool:
        """One scheduler iteration; returns whether a batch was launched or processed."""
        if self.paused is not None:  # paused (control.py did the abort/retract): run nothing
            return False
        did = self._step_overlap() if self.cfg.enable_overlap else self._step_normal()
        self._end_step()
        return did

    def _step_normal(self) -> bool:
        batch = self.get_next_batch()
        if batch is None:
            return False
        self.process_batch_result(batch, self.run_batch(batch))
        return True

    def _step_overlap(self) -> bool:
        # NOTE: batch N+1 is formed and launched *before* batch N's results are processed, so
        # the host work of processing overlaps the device computing N+1 (on CPU the order of
        # operations is the same; only the concurrency is missing). Two consequences:
        # - N+1 is formed without N's tokens: decode reads its inputs from the device-side
        #   future_tokens, and a request N finishes may still run (its token is dropped);
        # - forward_ct already counts N+1 while N is processed, so everything reported about
        #   N reads N's own snapshot, batch.forward_iter, taken in run_batch (seed 002).
        batch = self.get_next_batch()
        launched = None
        if batch is not None:
            result = self.run_batch(batch)
            launched = (batch.copy(), result)  # the copy keeps forward_iter
        previous, self.inflight = self.inflight, launched
        if previous is not None:
            self.process_batch_result(*previous)
        return batch is not None or previous is not None

    def sync_inflight(self) -> None:
        """Process the batch in flight now (overlap); needed before retracting, pausing..."""
        if self.inflight is not None:
            previous, self.inflight = self.inflight, None
            self.process_batch_result(*previous)

    def run_batch(self, batch: ScheduleBatch) -> BatchResult:
        self.forward_ct += 1
        batch.forward_iter = self.forward_ct  # snapshot at launch (seed 002)
        batch.launched_ns = _now_ns()
        if self.emitter.enabled:
            self.emitter.emit(
                BatchLaunched(
                    batch.launched_ns,
                    batch.forward_iter,
                    batch.mode,
                    [r.rid for r in batch.reqs],
                    batch.num_tokens,
                )
            )
        return self.runner.forward(batch)

    # -- forming batches --------------------------------------------------------------------

    def get_next_batch(self) -> ScheduleBatch | None:
        batch = self._get_prefill_batch()
        if batch is None and self.running:
            batch = self._get_decode_batch()
        return batch

    def _get_prefill_batch(self) -> ScheduleBatch | None:
        if self.chunked_req is None and (
            not self.waiting or len(self.running) >= self.cfg.max_running_requests
        ):
            return None
        cfg, tree = self.cfg, self.tree
        chunking = cfg.chunked_prefill_size is not None
        rem_tokens = min(cfg.max_prefill_tokens, cfg.chunked_prefill_size or cfg.max_prefill_tokens)
        # KV left for new work: free + evictable, minus what running requests will still grow.
        rem_kv = self._available_kv() - sum(
            int(r.remaining_new_tokens() * self.new_token_ratio) for r in self.running
        )
        batch = ScheduleBatch.prefill()
        candidates = [self.chunked_req] if self.chunked_req else []
        candidates += list(self.waiting)
        for req in candidates:
            new = req is not self.chunked_req
            if new and (
                len(self.running) + len(batch.reqs) >= cfg.max_running_requests
                or self.req_pool.available == 0
            ):
                break
            if new:
                evictable_before = tree.evictable_size if tree else 0
                self._admit(req)
                rem_kv -= evictable_before - (tree.evictable_size if tree else 0)
            extend = req.fill_len - req.kv_len
            take = extend
            if extend > rem_tokens and (chunking or batch.reqs):
                take = rem_tokens if chunking else 0
            last = take == extend
            cost = take + (int(req.remaining_new_tokens() * self.new_token_ratio) if last else 0)
            if take <= 0 or cost > rem_kv:
                if new:
                    self._unadmit(req)
                break
            if new:
                self.waiting.remove(req)
                batch.new_seqs += 1
                batch.cached_tokens += req.prefix_len
            start = req.kv_len
            self._extend_kv(req, take)
            rem_tokens -= take
            rem_kv -= cost
            batch.add(req, start, req.kv_len, last)
            if last:
                req.status = ReqStatus.RUNNING
                self.running.append(req)  # decodes from the next batch on, even with overlap
                self.chunked_req = None if self.chunked_req is req else self.chunked_req
            else:
                req.status = ReqStatus.PREFILLING
                self.chunked_req = req
                batch.chunked_reqs = 1
                break
            if rem_tokens <= 0:
                break
        return batch if batch.reqs else None

    def _get_decode_batch(self) -> ScheduleBatch | None:
        if self._available_kv() < len(self.running):
            # Retraction needs the true state: with overlap, finish the batch in flight first.
            self.sync_inflight()
            self._retract_until_fits()
            if not self.running:
                return None
        for req in self.running:
            self._extend_kv(req, 1)
        self.new_token_ratio = max(
            self.cfg.min_new_token_ratio, self.new_token_ratio - self.cfg.new_token_ratio_decay
        )
        return ScheduleBatch.decode(self.running)

    def _retract_until_fits(self) -> None:
        # Least progress first (fewest outputs, then longest prompt), as SGLang does; keep one.
        order = sorted(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
        for req in order:
            if self._available_kv() >= len(self.running) or len(self.running) == 1:
                break
            self.retract(req)
        if self._available_kv() < len(self.running) and self.chunked_req is not None:
            self.retract(self.chunked_req)  # a half-prefilled prompt holds KV too
        # Admission over-committed: reserve the full remaining budget again for a while.
        self.new_token_ratio = 1.0

    def retract(self, req: Req) -> None:
        """Move a running request back to the front of the waiting queue, freeing its KV."""
        freed = req.kv_len
        self._release_kv(req)
        if req is self.chunked_req:
            self.chunked_req = None
        else:
            self.running.remove(req)
        req.status = ReqStatus.WAITING
        req.fill_len = len(req.prompt_ids) + len(req.output_ids)
        req.retractions += 1
        self.waiting.appendleft(req)
        if self.emitter.enabled:
            self.emitter.emit(ReqRetracted(_now_ns(), req.rid, len(req.output_ids), freed))

    # -- KV bookkeeping ---------------------------------------------------------------------

    def _available_kv(self) -> int:
        return self.pool.available + (self.tree.evictable_size if self.tree else 0)

    def _admit(self, req: Req) -> None:
        """Give a waiting request a table row and its cached prefix (locked)."""
        row = self.req_pool.alloc()
        assert row is not None
        req.row = row
        req.prefix_len = req.kv_len = 0
        if self.tree is not None:
            # Leave at least one token to compute: its logits give the next token.
            slots, node = self.tree.match_prefix(req.seq_ids[: req.fill_len - 1])
            self.tree.inc_lock_ref(node)
            req.last_node = node
            if slots:
                self.req_pool.write(row, 0, slots)
            req.prefix_len = req.kv_len = len(slots)
        if req.retractions == 0:
            req.cached_tokens = req.prefix_len
            self._prompt_tokens_total += req.fill_len
            self._cached_tokens_total += req.prefix_len

    def _unadmit(self, req: Req) -> None:
        if self.tree is not None and req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        if req.retractions == 0:
            self._prompt_tokens_total -= req.fill_len
            self._cached_tokens_total -= req.prefix_len
        self.req_pool.free(req.row)  # type: ignore[arg-type]
        req.row, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def _extend_kv(self, req: Req, n: int) -> None:
        if self.pool.available < n and self.tree is not None:
            self.tree.evict(n - self.pool.available)
        slots = self.pool.alloc(n)
        assert slots is not None, "KV budget check let an allocation fail"
        self.req_pool.write(req.row, req.kv_len, slots)  # type: ignore[arg-type]
        req.kv_len += n

    def _cache_unfinished(self, req: Req, upto: int) -> None:
        """Put the computed whole pages of a running request into the radix cache, so
        requests sharing its prefix hit it while it still runs; it keeps them locked."""
        tree = self.tree
        if tree is None or req.row is None:
            return
        seq = req.seq_ids[:upto]
        slots = self.req_pool.slots(req.row, upto)
        cached = tree.insert(seq, slots)
        self.pool.free(slots[req.prefix_len : cached])  # pages someone else cached first
        tree_slots, node = tree.match_prefix(seq)
        self.req_pool.write(req.row, 0, tree_slots)
        tree.inc_lock_ref(node)
        tree.dec_lock_ref(req.last_node)  # type: ignore[arg-type]
        req.last_node, req.prefix_len = node, len(tree_slots)

    def _release_kv(self, req: Req) -> None:
        """Finish or retract: whole pages go to the radix cache, the rest back to the pool."""
        row, kv_len = req.row, req.kv_len
        assert row is not None
        slots = self.req_pool.slots(row, kv_len)
        if self.tree is not None:
            # Tokens may be fewer than slots: an abort drops the token that an in-flight
            # batch (overlap) already holds a slot for.
            seq = req.seq_ids[:kv_len]
            cached = self.tree.insert(seq, slots)
            self.pool.free(slots[req.prefix_len : cached])
            self.pool.free(slots[len(seq) // self.cfg.page_size * self.cfg.page_size :])
            self.tree.dec_lock_ref(req.last_node)  # type: ignore[arg-type]
        else:
            self.pool.free(slots)
        self.req_pool.free(row)
        req.row, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    # -- results ----------------------------------------------------------------------------

    def process_batch_result(self, batch: ScheduleBatch, result: BatchResult) -> None:
        tokens = iter(result.tokens())
        now = _now_ns()
        em = self.emitter
        eos = self.model_cfg.eos_token_id
        generated = 0
        for req, end, samples in zip(batch.reqs, batch.ends, batch.samples, strict=True):
            token = next(tokens) if samples else None
            if req.finished:  # overlap: it finished while this batch was in flight
                continue
            if batch.mode == MODE_PREFILL:
                self._cache_unfinished(req, end)
            if req.abort_requested is not None:
                self.finish(req, FINISH_ABORT, req.abort_requested)
                continue
            if token is None:
                continue
            req.output_ids.append(token)
            generated += 1
            if req.first_token_ns is None:
                req.first_token_ns = now
                if em.enabled:
                    em.emit(ReqFirstToken(now, req.rid, req.cached_tokens))
            reason = req.check_finished(token, eos)
            if reason is not None:
                self.finish(req, reason)
            elif req.on_output is not None:
                req.on_output(self._output(req, [token]))
        if batch.mode == MODE_DECODE:
            self._update_gen_throughput(generated, now)
        if em.enabled:
            self._report_batch_done(batch, generated, now)

    def finish(self, req: Req, reason: str, abort_reason: str = "") -> None:
        req.status = ReqStatus.FINISHED
        req.finish_reason = reason
        req.finished_ns = now = _now_ns()
        if req in self.running:
            self.running.remove(req)
        if self.chunked_req is req:
            self.chunked_req = None
        if req.row is not None:
            self._release_kv(req)
        self.reqs.pop(req.rid, None)
        if self.emitter.enabled:
            if reason == FINISH_ABORT:
                self.emitter.emit(ReqAborted(now, req.rid, len(req.output_ids), abort_reason))
            else:
                self.emitter.emit(
                    ReqFinished(
                        now,
                        req.rid,
                        len(req.prompt_ids),
                        len(req.output_ids),
                        req.cached_tokens,
                        reason,
                        req.on_output is not None,
                    )
                )
        if req.on_output is not None:
            req.on_output(self._output(req, req.output_ids[-1:] if reason != FINISH_ABORT else []))
        if self.on_finish:
            result = self.result_of(req)
            for callback in self.on_finish:
                callback(result, req)

    def _emit_abort(self, req: Req, reason: str) -> None:
        if self.emitter.enabled:
            self.emitter.emit(ReqAborted(_now_ns(), req.rid, 0, reason))

    def _output(self, req: Req, new: list[int]) -> RequestOutput:
        return RequestOutput(
            req.rid,
            new,
            req.output_ids,
            req.finished,
            req.finish_reason,
            len(req.prompt_ids),
            req.cached_tokens,
            len(req.output_ids),
        )

    def result_of(self, req: Req) -> GenerationResult:
        end = req.finished_ns or _now_ns()
        return GenerationResult(
            rid=req.rid,
            prompt_ids=req.prompt_ids,
            output_ids=list(req.output_ids),
            text=self.tokenizer.decode(req.output_ids),
            finish_reason=req.finish_reason or "",
            prompt_tokens=len(req.prompt_ids),
            cached_tokens=req.cached_tokens,
            completion_tokens=len(req.output_ids),
            e2e_latency_s=(end - req.queued_ns) / 1e9,
            ttft_s=(req.first_token_ns - req.queued_ns) / 1e9 if req.first_token_ns else None,
            retractions=req.retractions,
        )

    # -- stats and telemetry ----------------------------------------------------------------

    def token_usage(self) -> float:
        used = self.pool.size - self._available_kv()
        return used / self.pool.size

    def _update_gen_throughput(self, generated: int, now: int) -> None:
        if self._window_start_ns is None:
            self._window_start_ns = now
        self._window_tokens += generated
        self._window_batches += 1
        if self._window_batches >= self.cfg.decode_log_interval:
            elapsed = (now - self._window_start_ns) / 1e9
            self.last_gen_throughput = self._window_tokens / elapsed if elapsed > 0 else 0.0
            self._window_start_ns, self._window_tokens, self._window_batches = now, 0, 0

    def reset_throughput_window(self) -> None:
        """Start a fresh gen_throughput window (for the control plane: after idle or pause)."""
        self._window_start_ns, self._window_tokens, self._window_batches = None, 0, 0

    def _report_batch_done(self, batch: ScheduleBatch, generated: int, now: int) -> None:
        # Seed 002: the batch's own snapshot, never the live counter (it may be N+1 by now).
        it = batch.forward_iter if batch.forward_iter is not None else self.forward_ct
        if batch.mode == MODE_PREFILL:
            stats = PrefillStats(
                new_seqs=batch.new_seqs,
                new_tokens=batch.num_tokens,
                cached_tokens=batch.cached_tokens,
                running_reqs=len(self.running),
                queued_reqs=len(self.waiting),
                token_usage=self.token_usage(),
                chunked_reqs=batch.chunked_reqs,
            )
            self.emitter.emit(BatchDone(now, it, batch.mode, prefill=stats))
        else:
            stats = DecodeStats(
                running_reqs=len(batch.reqs),
                num_tokens=batch.num_kv_tokens,
                generated_tokens=generated,
                gen_throughput=self.last_gen_throughput,
                token_usage=self.token_usage(),
                queued_reqs=len(self.waiting),
                cuda_graph=False,
            )
            self.emitter.emit(BatchDone(now, it, batch.mode, decode=stats))

    def _end_step(self) -> None:
        """Once per step: this step's KV events as one batch, KvLoad while busy, then flush."""
        em = self.emitter
        if em.enabled:
            now = _now_ns()
            if self.tree is not None:
                kv = self.tree.take_events()
                if kv:
                    em.emit(KvEvents(now, self.forward_ct or None, kv))
            if now >= self._next_kv_load_ns and self.has_work():
                em.emit(self.kv_load(now))
                self._next_kv_load_ns = now + int(self.cfg.kv_load_interval_s * 1e9)
        em.end_step()

    def kv_load(self, now: int | None = None) -> KvLoad:
        page = self.cfg.page_size
        used = self.pool.size - self._available_kv()
        prompt = self._prompt_tokens_total
        return KvLoad(
            ts=now or _now_ns(),
            request_active_slots=len(self.running) + (1 if self.chunked_req else 0),
            request_total_slots=self.cfg.max_running_requests,
            kv_active_blocks=used // page,
            kv_total_blocks=self.pool.size // page,
            num_requests_waiting=len(self.waiting),
            cache_usage=used / self.pool.size,
            prefix_hit_rate=self._cached_tokens_total / prompt if prompt else 0.0,
            dp_rank=self.cfg.dp_rank or 0,
        )

    # -- memory view (the control plane's leak check builds on it) --------------------------

    def memory_snapshot(self) -> dict[str, int]:
        cached = self.tree.total_size if self.tree else 0
        return {
            "pool_size": self.pool.size,
            "free_slots": self.pool.available,
            "cached_slots": cached,
            "in_use_slots": self.pool.size - self.pool.available - cached,
            "req_table_used": self.req_pool.used,
        }
