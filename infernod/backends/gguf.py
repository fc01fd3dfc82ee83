"""GgufEngine: continuous batching over the llama.cpp C API (llama-cpp-python low-level bindings).

One llama.cpp context per model with ``n_seq_max = n_slots + park_slots`` and a unified KV
cache of ``n_ctx * n_slots`` cells, so every slot can hold a full ``n_ctx`` sequence and running
sequences can share cells (prefix reuse via ``llama_memory_seq_cp``). Every token attends over
all cells in use, so a finished sequence does not stay in the pool: it moves to RAM (see
hostcache.py) and comes back when a request continues it. A preempted
request's cells are kept on a spare sequence id (a park, see parking.py) until it resumes. One decode
thread owns the context. Each :meth:`GgufEngine.step` builds one batch (one token for every
decoding sequence plus at most ``prefill_chunk`` prompt tokens of admitted sequences), calls
``llama_decode`` once and samples each sequence with its own C sampler chain, reading logits
only inside C.

Threading: ``submit``/``cancel``/``preempt``/``free_slots`` may be called from any thread; they
only touch a command queue under a lock. Everything else runs on the decode thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from infernod.backends import llama_native as native
from infernod.backends.base import EngineSink, GenerationRequest, GuardedSink
from infernod.backends.cells import KvPlacement
from infernod.backends.gguf_embed import MAX_LENGTH as EMBED_MAX_TOKENS
from infernod.backends.gguf_embed import EmbedRuns
from infernod.backends.grammar_sampling import GrammarSampling
from infernod.backends.hostcache import HostCache
from infernod.backends.logprobs import token_logprobs
from infernod.backends.onnx_engine import RunDone
from infernod.backends.parking import ParkingLot, park_count
from infernod.backends.runstate import Run, Slot, unstarted_stats
from infernod.backends.textstream import TextStream
from infernod.protocol.errors import CODES, InfernoError

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
_NS_PER_MS = 1e6


class GgufEngine:
    """Continuous-batching engine for one GGUF model. See docs/architecture.md for the contract."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 4096,
        n_slots: int = 8,
        n_threads: int = 2,
        n_threads_batch: int = 2,
        n_gpu_layers: int = 0,
        swa_full: bool = False,
        prefill_chunk: int = 256,
        sink: EngineSink | None = None,
        flash_attn: str = "off",  # "auto" | "on" | "off": the daemon passes models.flash_attn
        park_slots: int | None = None,
        host_cache_bytes: int = 256 << 20,
        grammar_first: bool = False,  # True: a grammar masks every candidate (bench, tests)
    ) -> None:
        if n_slots < 1 or n_ctx < 16 or prefill_chunk < 1:
            raise InfernoError("config_error", "need n_slots >= 1, n_ctx >= 16, prefill_chunk >= 1")
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.n_gpu_layers = n_gpu_layers
        self.swa_full = swa_full
        # A step's batch (one token per decoding slot plus the prompt chunk) must fit the
        # context's cells: llama.cpp clamps n_batch to them and aborts on a larger batch.
        self.prefill_chunk = prefill_chunk = min(prefill_chunk, n_slots * (n_ctx - 1))
        self.flash_attn = flash_attn
        self.park_slots = park_count(n_slots, park_slots)
        self.sink = GuardedSink(sink)  # a failing sink must not kill the decode thread
        self.supports_gpu_offload = False
        self.n_swa = 0
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._vocab: Any = None
        self._batch: Any = None
        self._n_batch = prefill_chunk + n_slots
        self._n_vocab = 0
        self._memory: dict[str, int] = {}
        self._slots = [Slot(i) for i in range(n_slots)]
        self._parks = ParkingLot(n_slots, self.park_slots)
        self._host = HostCache(host_cache_bytes)
        self._embeds = EmbedRuns(min(n_ctx, EMBED_MAX_TOKENS))  # made on first use
        self._cells = KvPlacement(self._slots, self._parks, self._host)
        self._waiting: deque[tuple[GenerationRequest, int]] = deque()
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, Any]] = deque()
        self._reserved = 0  # submitted and not yet finished (guarded by _cond)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._piece = native.Pieces()
        self.grammar_sampling = GrammarSampling(0, grammar_first)

    # ---- public, thread-safe -------------------------------------------------------------

    def start(self) -> None:
        """Load the model and context (blocking) and start the decode thread.

        The load runs *on* the decode thread: llama.cpp's CPU backend (OpenMP in this build)
        keeps a worker pool per calling thread, and a second pool (the loader's) idling next
        to the decode thread's makes libgomp throttle its spinning, which cost 20-30 % of
        single-stream decode speed on 2 cores. One thread, one pool.
        """
        loaded = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._load()
            except BaseException as e:  # handed to the caller of start()
                failure.append(e)
                return
            finally:
                loaded.set()
            self._loop()

        self._thread = threading.Thread(target=run, name=f"decode-{self.path.stem}",
                                        daemon=True)
        self._thread.start()
        while not loaded.wait(1.0):  # a load takes as long as it takes; the thread may die
            if not self._thread.is_alive():
                break
        if failure:
            raise failure[0]

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it is admitted on the next step that has a free slot."""
        with self._cond:
            self._reserved += 1
            self._commands.append(("submit", (request, time.perf_counter_ns())))
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot and KV cells are freed within one step."""
        self._command("cancel", request_id)

    def preempt(self, request_id: str) -> None:
        """Finish a request with reason "preempted"; stats carry ``generated_tokens``."""
        self._command("preempt", request_id)

    def free_slots(self) -> int:
        """Slots not taken by running or queued requests."""
        with self._cond:
            return max(0, self.n_slots - self._reserved)

    def memory_bytes(self) -> dict[str, int]:
        """Measured memory after load: weights, context (KV + compute buffers) and total."""
        return dict(self._memory)

    def slot_state(self) -> list[dict[str, Any]]:
        """Per-slot diagnostics: request, cached tokens and the KV positions llama.cpp holds.
        A snapshot without locking: exact only while the engine is idle."""
        return [native.seq_state(self._mem, s.seq_id, s.kv, s.run.req.request_id if s.run
                                 else None) for s in self._slots]

    def park_state(self) -> list[dict[str, Any]]:
        """Per-park diagnostics, like :meth:`slot_state` (same caveat)."""
        return self._parks.state()

    def host_cache_stats(self) -> dict[str, Any]:
        """Idle sequences saved to RAM (see hostcache.py): entries, bytes, window checkpoints
        (checkpoints.py, running sequences' included) and counters."""
        return self._cells.stats()

    def wire_info(self) -> dict[str, Any]:
        """What ``models.list``/``models.show`` add for a loaded model (read from the loop
        thread: counters only, a step may be half-way through changing them)."""
        return {"host_cache": self.host_cache_stats(), **self._embeds.wire_info()}

    def embed(self, args: dict[str, Any], on_done: RunDone) -> None:
        """Embed texts (embed_batch's args, result) between two steps (gguf_embed.py)."""
        self._command("embed", (args, on_done))

    def park_evictions(self) -> dict[str, int]:
        """Parks dropped before their request resumed, by cause: lru, admission, decode."""
        return dict(self._parks.evictions)

    def close(self) -> None:
        """Stop the decode thread, abort what is running, free the native objects."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._abort_all("engine closed")
        self._free_native()

    def _command(self, kind: str, arg: Any) -> None:
        with self._cond:
            self._commands.append((kind, arg))
            self._cond.notify()

    # ---- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        """Load weights, create the context and measure what both cost."""
        llama = native.bindings()
        native.route_logs()
        llama.llama_backend_init()
        self.supports_gpu_offload = bool(llama.llama_supports_gpu_offload())
        if not self.path.is_file():
            raise InfernoError("unknown_model", f"model file not found: {self.path}")
        try:
            self._model = native.load_model(self.path, self.n_gpu_layers)
            self._vocab = llama.llama_model_get_vocab(self._model)
            self._piece = native.Pieces(self._vocab)
            self._n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
            self.grammar_sampling.n_vocab = self._n_vocab
            self.n_swa = int(llama.llama_model_n_swa(self._model))
            rss0 = native.rss_bytes()
            # one context for all slots: unified KV of n_ctx per slot; parks are extra
            # sequence ids without extra cells (a sliding window grows by one per id, though)
            self._ctx = native.create_context(
                self._model, n_cells=self.n_ctx * self.n_slots,
                n_seq_max=self.n_slots + self.park_slots, n_batch=self._n_batch,
                n_threads=(self.n_threads, self.n_threads_batch), swa_full=self.swa_full,
                flash_attn=self.flash_attn)
            self._mem = llama.llama_get_memory(self._ctx)
            self._parks.attach(self._mem)
            self._cells.attach(self._ctx, self._mem, 0 if self.swa_full else self.n_swa)
            self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
            # one full batch, so compute buffers are touched (and measured) before serving
            native.warm_up(self._ctx, self._mem, self._batch, self._vocab, self._n_batch)
            context_bytes = max(0, native.rss_bytes() - rss0)
        except InfernoError:
            self._free_native()
            raise
        except Exception as e:
            self._free_native()
            raise InfernoError("internal", f"loading {self.path.name} failed: {e}") from e
        model_bytes = int(llama.llama_model_size(self._model))
        self._memory = {
            "model_bytes": model_bytes,
            "context_bytes": context_bytes,
            "total_bytes": model_bytes + context_bytes,
        }

    def _free_native(self) -> None:
        llama = native.bindings()
        self._embeds.close()
        for slot in self._slots:
            if slot.run is not None:
                native.free_samplers(slot.run.sampler, slot.run.grammar)
                slot.run = None
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    # ---- decode thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._has_work() and not self._stopping:
                    if self._cells.idle_slot_with_cells() is not None:
                        break  # idle time: move one idle sequence to RAM, then look again
                    self._cond.wait(_IDLE_WAIT_S)
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            try:
                self._apply(commands)
                if self._has_work():
                    self.step()
                elif (idle := self._cells.idle_slot_with_cells()) is not None:
                    self._cells.offload(idle)
            except Exception:  # keep serving other requests; the failing ones got on_error
                log.exception("decode step failed")
                self._abort_all("internal error in the decode thread (see the daemon log)")

    def _has_work(self) -> bool:
        return any(s.run is not None for s in self._slots) or (
            bool(self._waiting) and self._free_slot_exists()
        )

    def _free_slot_exists(self) -> bool:
        return any(s.run is None for s in self._slots)

    def _apply(self, commands: list[tuple[str, Any]]) -> None:
        for kind, arg in commands:
            if kind == "submit":
                self._waiting.append(arg)
            elif kind == "embed":
                self._embeds.run(self._model, self._vocab, self.n_threads_batch, *arg)
            elif kind in ("cancel", "preempt"):
                self._stop_request(arg, "cancelled" if kind == "cancel" else "preempted")
        while self._waiting and self._free_slot_exists():
            req, submit_ns = self._waiting.popleft()
            self._admit(req, submit_ns)

    def _stop_request(self, request_id: str, reason: str) -> None:
        for slot in self._slots:
            if slot.run is not None and slot.run.req.request_id == request_id:
                self._finish(slot, reason)
                return
        for item in list(self._waiting):
            if item[0].request_id == request_id:
                self._waiting.remove(item)
                self._finish_without_slot(item[0], reason)
                return
        if reason == "cancelled":  # preempted and cancelled while queued: its park is useless
            self._parks.drop_request(request_id)

    def _finish_without_slot(self, req: GenerationRequest, reason: str) -> None:
        """Finish a request that never ran (stopped while queued, or nothing left to do)."""
        self._release_reservation()
        self.sink.on_finished(req.request_id, reason, unstarted_stats(req, reason))

    # ---- admission and prefix reuse ------------------------------------------------------------

    def _admit(self, req: GenerationRequest, submit_ns: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            prompt = self._prompt_tokens(req)
        except InfernoError as e:
            self._reject(req, e.code, e.message, e.hint)
            return
        tokens = prompt + list(req.resume_tokens)
        tokenize_ns = time.perf_counter_ns() - t0
        if not tokens:
            self._reject(req, "bad_request", "empty prompt", None)
            return
        if len(tokens) >= self.n_ctx:
            msg = f"prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
            msg += "(one token must stay free for the reply)"
            self._reject(req, "context_exceeded", msg, None)
            return
        if req.max_tokens <= len(req.resume_tokens):
            self._finish_without_slot(req, "length")
            return
        try:
            grammar = (None if req.grammar is None else
                       native.make_grammar(self._vocab, req.grammar, req.resume_tokens))
        except InfernoError as e:
            self._reject(req, e.code, e.message, e.hint)
            return
        sampler = native.make_sampler(self._n_vocab, req.sampling, tokens)
        slot, cached, shared = self._cells.pick_slot(tokens)
        self._parks.make_room(len(tokens) - cached, self._slots, self.n_ctx * self.n_slots)
        run = Run(
            req=req,
            submit_ns=submit_ns,
            tokens=tokens,
            n_resume=len(req.resume_tokens),
            sampler=sampler,
            greedy=native.plain_greedy(req.sampling),
            grammar=grammar,
            text=TextStream(req.stop),
            n_done=cached,
            cached=cached,
            checkpoint_at=self._cells.plan(len(tokens), cached, req.max_tokens, shared),
            tokenize_ns=tokenize_ns,
            admit_ns=time.perf_counter_ns(),
        )
        if req.resume_tokens:
            run.text.seed(b"".join(self._piece(t) for t in req.resume_tokens))
        slot.run = run
        self.sink.on_started(
            req.request_id,
            {
                "prompt_tokens": len(tokens),
                "cached_tokens": cached,
                "tokenize_ms": tokenize_ns / _NS_PER_MS,
                "slot": slot.seq_id,
            },
        )

    def _reject(self, req: GenerationRequest, code: str, message: str, hint: str | None) -> None:
        self._release_reservation()
        self._emit_error(req.request_id, code, message, hint)

    def _prompt_tokens(self, req: GenerationRequest) -> list[int]:
        if req.prompt_tokens is not None:
            return list(req.prompt_tokens)
        if req.prompt is None:
            raise InfernoError("bad_request", "request has neither prompt nor prompt_tokens")
        return self.tokenize(req.prompt, add_bos=req.add_bos)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize with the model's vocabulary (read-only, safe from any thread after start)."""
        return native.tokenize(self._vocab, text, add_bos, special)

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> None:
        """Build one batch (decode tokens + prompt chunks), decode it once, sample outputs."""
        llama = native.bindings()
        while (idle := self._cells.idle_slot_with_cells()) is not None:
            self._cells.offload(idle)  # idle cells would cost this and every later step attention
        outputs = self._fill_batch()
        if not outputs and self._batch.n_tokens == 0:
            return
        rc = llama.llama_decode(self._ctx, self._batch)
        while rc == 1 and self._parks.evict_oldest():  # no room: parked cells go first
            rc = llama.llama_decode(self._ctx, self._batch)
        if rc != 0:
            self._fail_batch(outputs, rc)
            return
        now = time.perf_counter_ns()
        for idx, slot in outputs:
            run = slot.run
            assert run is not None
            if run.grammar is not None:
                token = self.grammar_sampling.sample(self._ctx, idx, run.grammar,
                                                     None if run.greedy else run.sampler)
            elif run.greedy:
                token = native.argmax_token(self._ctx, idx, self._n_vocab)
            else:
                token = int(llama.llama_sampler_sample(run.sampler, self._ctx, idx))
            if run.req.logprobs is not None:  # before the next decode overwrites the logits
                run.unsent_logprobs.append(token_logprobs(
                    native.logits_row(self._ctx, idx, self._n_vocab), token,
                    run.req.logprobs, self._piece))
            self._on_token(slot, run, token, now)

    def _fill_batch(self) -> list[tuple[int, Slot]]:
        """Put every pending token and prompt chunks (within the budget) into the batch.
        Returns (batch index, slot) for each position that produces logits."""
        outputs: list[tuple[int, Slot]] = []
        n = 0
        urgent = self._urgent_prefill()
        for slot in self._slots:
            run = slot.run
            if run is not None and run.pending is not None and not urgent:
                self._put(n, run.pending, len(slot.kv), slot.seq_id, True)
                slot.kv.append(run.pending)
                run.pending = None
                outputs.append((n, slot))
                n += 1
        budget = self.prefill_chunk
        for slot, run in self._runs_by_age():
            if budget <= 0:
                break
            if urgent and run.req.priority != "vip":
                continue
            todo = len(run.tokens) - run.n_done
            if todo <= 0:
                continue
            take = min(todo, budget)
            if run.checkpoint_at:  # the window as of n_done; the chunk stops at the next one
                if run.checkpoint_at[0] == run.n_done:
                    self._cells.checkpoint(slot)
                    run.checkpoint_at.pop(0)
                if run.checkpoint_at:
                    take = min(take, run.checkpoint_at[0] - run.n_done)
            for i in range(run.n_done, run.n_done + take):
                last = i == len(run.tokens) - 1
                self._put(n, run.tokens[i], i, slot.seq_id, last)
                if last:
                    outputs.append((n, slot))
                n += 1
            slot.kv.extend(run.tokens[run.n_done : run.n_done + take])
            run.n_done += take
            budget -= take
        self._batch.n_tokens = n
        return outputs

    def _urgent_prefill(self) -> bool:
        """A vip prompt waits to be evaluated: give it a step to itself. The others lose one
        step (their next token waits ~one decode), the vip's first token does not wait for
        everyone's: its time to first token stays close to the idle figure."""
        return any(s.run is not None and s.run.req.priority == "vip"
                   and 0 < len(s.run.tokens) - s.run.n_done <= self.prefill_chunk
                   for s in self._slots)  # only its last chunk: a long prompt stalls no one

    def _runs_by_age(self) -> list[tuple[Slot, Run]]:
        """Running slots, vip first, then oldest admission first: prompts are prefilled first
        come, first served within a class."""
        runs = [(s, s.run) for s in self._slots if s.run is not None]
        return sorted(runs, key=lambda sr: (sr[1].req.priority != "vip", sr[1].admit_ns))

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _fail_batch(self, outputs: list[tuple[int, Slot]], rc: int) -> None:
        """llama_decode failed: the cells of this batch are undefined, drop the affected runs."""
        msg = f"llama_decode returned {rc}"
        log.error("decode failed: %s", msg)
        for slot in self._slots:
            if slot.run is not None:
                self._error(slot, "internal", msg)

    # ---- per token -------------------------------------------------------------------------

    def _on_token(self, slot: Slot, run: Run, token: int, now: int) -> None:
        if run.first_ns == 0:
            run.first_ns = now
        else:
            run.itl_ns.append(now - run.last_ns)
        run.last_ns = now
        llama = native.bindings()
        if not run.req.ignore_eos and llama.llama_vocab_is_eog(self._vocab, token):
            if run.unsent_logprobs:
                run.unsent_logprobs.pop()  # the end-of-generation token delivers no text
            self._finish(slot, "eos")
            return
        run.generated.append(token)
        run.unsent_tokens += 1
        t0 = time.perf_counter_ns()
        text = run.text.push(self._piece(token))
        run.detok_ns += time.perf_counter_ns() - t0
        if text:
            self.sink.on_tokens(run.req.request_id, text, run.unsent_tokens, run.take_logprobs())
            run.unsent_tokens = 0
        if run.text.stopped:
            self._finish(slot, "stop")
        elif run.n_resume + len(run.generated) >= run.req.max_tokens:
            self._finish(slot, "length")
        elif len(slot.kv) + 1 >= self.n_ctx:
            self._finish(slot, "length")
        else:
            run.pending = token

    def token_bytes(self, token: int) -> bytes:
        """Bytes of one token (special tokens render as nothing). Decode thread only (or
        while idle): it reuses one buffer."""
        return self._piece(token)

    # ---- finishing -------------------------------------------------------------------------

    def _finish(self, slot: Slot, reason: str) -> None:
        """End a run: flush text, free its sampler, keep (or drop) its cells, report stats."""
        run = slot.run
        assert run is not None
        if reason in ("length", "eos"):
            tail = run.text.flush()
        elif reason == "preempted":
            tail = run.text.flush_stop_holdback()
        else:
            tail = ""
        if tail:
            self.sink.on_tokens(run.req.request_id, tail, run.unsent_tokens, run.take_logprobs())
        if reason == "preempted":  # its slot may go to a vip in this very step
            self._parks.park(slot, run.req.request_id)
        self._release(slot, keep_cells=reason != "cancelled")
        stats = run.stats(reason)
        self.sink.on_finished(run.req.request_id, reason, stats)

    def _error(self, slot: Slot, code: str, message: str) -> None:
        run = slot.run
        assert run is not None
        self._release(slot, keep_cells=False)
        self._emit_error(run.req.request_id, code, message, None)

    def _release(self, slot: Slot, keep_cells: bool) -> None:
        llama = native.bindings()
        run = slot.run
        assert run is not None
        native.free_samplers(run.sampler, run.grammar)
        slot.run = None
        slot.released_ns = time.perf_counter_ns()
        if not keep_cells:
            llama.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.kv = []
            slot.checkpoints = []
        self._release_reservation()

    def _release_reservation(self) -> None:
        """Free the slot count before the sink hears of the finish, so a scheduler reacting
        to on_finished already sees the slot as free."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def _abort_all(self, message: str) -> None:
        for slot in self._slots:
            if slot.run is not None:
                self._error(slot, "aborted", message)
        while self._waiting:
            req, _ = self._waiting.popleft()
            self._reject(req, "aborted", message, None)

    def _emit_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        self.sink.on_error(request_id, code, message, hint if hint is not None else CODES[code])
