"""The scale-out job queue engine: Redis Streams with one consumer group.

Layout (``P`` is the configured key prefix, default ``tandem``):

- ``P:job:{id}``: a hash per job: the request's metadata (``meta`` JSON), its state (``status``,
  ``started``, ``finished``, ``expires``, ``served_version``) and, once finished, its result
  (``error``, ``result_status``, ``result_headers``, ``result_body``). It gets a TTL of
  ``jobs.result_ttl_s`` when the job finishes; Redis forgets it then.
- ``P:body:{id}``: the request body as received, until the job finishes or is deleted (a string
  of its own, so that a worker reads a group's bodies with one MGET). Jobs stored by an older
  producer kept theirs in the hash (``body``): they are read from there.
- ``P:stream:{n}``: one stream per job priority ``n`` (0..9), each entry ``{"id": job id}``, read
  by the consumer group ``P-workers``. Workers read the highest priority first.
- ``P:idem:{model}:{key}``: an Idempotency-Key's job id (the same TTL as its job once finished).
- ``P:stats``: counters: results stored, results dropped because their job had one already.

A submit writes the hash and the stream entry in one MULTI/EXEC, and is answered 202 only after
Redis took both (with ``appendonly yes`` they survive a Redis restart; ``appendfsync always``
makes that true of a power cut too). A worker claims a group of jobs with one script (XREADGROUP
per priority, best first; the jobs marked running) and one pipeline of HGETs (their bodies), runs
them, then one script stores each result only while its job is unfinished (a job run twice keeps
its first result) and, after that, XACKs and XDELs the entries: three round trips per group.
Entries a worker claimed and did not acknowledge within ``claim_timeout_s`` (it died, or hangs) are
taken over by another worker with XAUTOCLAIM: delivery is at-least-once, results are once per job
id. The scripts derive job keys from the prefix (not only from KEYS): like the submit's
transaction over two keys, that rules out Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from typing import Any

import msgpack

from tandem.shared.errors import InvalidInput, Overloaded, Unavailable
from tandem.shared.jobs import MAX_PRIORITY, MIN_PRIORITY, JobConflict

from .job_queue import Completion, JobRecord

__all__ = ["RedisJobQueue", "import_redis"]

_META = ("model", "version", "protocol", "header_length", "rows", "priority", "created", "body_hash", "idempotency_key", "callback")
#: Seconds a blocking read waits at most at once (then the caller's loop looks at its stop flag).
_MAX_BLOCK_S = 1.0

# Lua shared by the two claim scripts: take one stream entry. A job still to run is marked running
# and appended to ``out`` as (stream, entry id, job id, meta, served_version); an entry whose job
# was deleted, expired or already answered is acknowledged and dropped on the spot. The bodies
# are read apart, with plain HGETs: through Lua, each one is copied into a Lua string and out
# again, which cost Redis more than everything else the claim does.
_TAKE = """
local function take(out, stream, group, eid, jid, key, now)
  local h = jid and redis.call('HMGET', key, 'status', 'meta', 'served_version')
  if not h or not h[1] or not h[2] or h[1] == 'succeeded' or h[1] == 'failed' then
    redis.call('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
    return 0
  end
  redis.call('HSET', key, 'status', 'running', 'started', now)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = stream, eid, jid, h[2], h[3]
  return 1
end
local function job_id(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then return fields[i + 1] end
  end
  return nil
end
"""
# Read up to ``limit`` new entries for this consumer, best priority first, and take them: one round
# trip for what took an XLEN per stream, an XREADGROUP per priority and a script. KEYS: the
# streams, best first. ARGV: group, consumer, limit, now, the job keys' prefix.
_CLAIM_NEW = _TAKE + """
local group, consumer, limit, now, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local out, taken = {}, 0
for s = 1, #KEYS do
  if taken >= limit then break end
  if redis.call('XLEN', KEYS[s]) > 0 then
    local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', limit - taken, 'STREAMS', KEYS[s], '>')
    if got then
      for _, entry in ipairs(got[1][2]) do
        local jid = job_id(entry[2])
        taken = taken + take(out, KEYS[s], group, entry[1], jid, prefix .. (jid or ''), now)
      end
    end
  end
end
return out
"""
# Take entries already delivered to this consumer (reclaimed with XAUTOCLAIM, or read by a
# blocking XREADGROUP). ARGV: group, now, the job keys' prefix, then (stream, entry id, job id)
# per entry.
_CLAIM_READ = _TAKE + """
local group, now, prefix = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 3 do
  take(out, ARGV[i], group, ARGV[i + 1], ARGV[i + 2], prefix .. ARGV[i + 2], now)
end
return out
"""
# Store results, each only while its job is unfinished, then acknowledge (XACK + XDEL) their
# stream entries: both in one script, so an entry is never acknowledged before its result is
# stored, and it all takes one round trip. Returns 1 (stored) or 0 per job. KEYS: stats. ARGV:
# now, ttl ms, the job keys' prefix, the group, and one msgpack array with per job [job id,
# status, error, result_status, result_headers, result_body, served_version ('' = keep), started
# ('' = the claim set it), idempotency key ('' = none), stream ('' = no entry), entry id]. ARGV[6]:
# the body keys' prefix. (one argument: packing
# thousands of small ones costs the client more than the work; the old msgpack format, which
# Redis's Lua reads). The stats hash counts results stored ("results"), results of jobs that had
# one already ("repeats": a job run again after its worker was presumed dead) and of jobs
# deleted meanwhile ("forgotten").
_COMPLETE = """
local stats, now, ttl, prefix, group = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires = tostring(tonumber(now) + tonumber(ttl) / 1000)
local rows = cmsgpack.unpack(ARGV[5])
local out, counts, acks = {}, {results = 0, repeats = 0, forgotten = 0}, {}
for i, r in ipairs(rows) do
  local key = prefix .. r[1]
  local s = redis.call('HGET', key, 'status')
  if not s then
    counts.forgotten = counts.forgotten + 1
    out[i] = 0
  elseif s == 'succeeded' or s == 'failed' then
    counts.repeats = counts.repeats + 1
    out[i] = 0
  else
    counts.results = counts.results + 1
    -- The request body is dropped (an older producer's, in the hash, emptied in the same HSET).
    redis.call('HSET', key, 'status', r[2], 'finished', now, 'expires', expires, 'error', r[3],
      'result_status', tostring(r[4]), 'result_headers', r[5], 'result_body', r[6], 'body', '')
    redis.call('DEL', ARGV[6] .. r[1])
    if r[7] ~= '' then redis.call('HSET', key, 'served_version', r[7]) end
    if r[8] ~= '' then redis.call('HSETNX', key, 'started', r[8]) end
    redis.call('PEXPIRE', key, ttl)
    if r[9] ~= '' then redis.call('PEXPIRE', r[9], ttl) end
    out[i] = 1
  end
  if r[10] ~= '' then
    local ids = acks[r[10]]
    if not ids then
      ids = {}
      acks[r[10]] = ids
    end
    ids[#ids + 1] = r[11]
  end
end
for name, n in pairs(counts) do
  if n > 0 then redis.call('HINCRBY', stats, name, n) end
end
for stream, ids in pairs(acks) do
  for i = 1, #ids, 500 do
    local part = {unpack(ids, i, math.min(i + 499, #ids))}
    redis.call('XACK', stream, group, unpack(part))
    redis.call('XDEL', stream, unpack(part))
  end
end
return out
"""


def import_redis() -> Any:
    """The ``redis`` client package (``redis>=5``), or an error saying how to install it."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise InvalidInput(
            "the Redis job queue needs the redis client: pip install 'redis>=5' (or tandem[cloud])"
        ) from None
    return aioredis


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


def _float(v: Any) -> float | None:
    t = _text(v)
    return float(t) if t not in (None, "") else None


class RedisJobQueue:
    """A :class:`~.job_queue.JobQueue` on Redis Streams (see the module docstring)."""

    def __init__(self, url: str, *, prefix: str = "tandem", claim_timeout_s: float = 60.0, consumer: str | None = None) -> None:
        aioredis = import_redis()
        from redis import exceptions

        self._errors = (exceptions.ConnectionError, exceptions.TimeoutError, OSError)
        self._response_error = exceptions.ResponseError
        self._redis_error = exceptions.RedisError
        try:
            self._redis = aioredis.Redis.from_url(
                url, socket_connect_timeout=2.0, socket_timeout=_MAX_BLOCK_S + 10.0, health_check_interval=30,
            )
        except ValueError as e:
            raise InvalidInput(f"bad Redis URL {url!r}: {e}") from None
        self.url = url
        self.prefix = prefix
        self.group = f"{prefix}-workers"
        self.claim_timeout_s = claim_timeout_s
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        #: Counters of stored results ("results"), results of jobs that already had one ("repeats":
        #: a job run again after its worker was presumed dead) and of jobs deleted meanwhile ("forgotten").
        self.stats_key = f"{prefix}:stats"
        self._streams = [self._stream(p) for p in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)]  # best first
        self._groups_ready = False
        self._reclaimed_at = 0.0
        self._job_prefix = f"{prefix}:job:"
        self._body_prefix = f"{prefix}:body:"
        self._claim_new = self._redis.register_script(_CLAIM_NEW)
        self._claim_read = self._redis.register_script(_CLAIM_READ)
        self._complete = self._redis.register_script(_COMPLETE)

    # --- keys -----------------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return self._job_prefix + job_id

    def _stream(self, priority: int) -> str:
        return f"{self.prefix}:stream:{priority}"

    def _idem(self, model: str, key: str) -> str:
        return f"{self.prefix}:idem:{len(model)}:{model}:{key}"

    # --- plumbing -------------------------------------------------------------------------------

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except self._errors as e:
            raise Unavailable(f"the job queue (Redis at {self._where()}) is unreachable: {e}") from None
        except self._redis_error as e:
            if "NOGROUP" in str(e):
                # Redis lost the streams (restarted without its data): make them again next time.
                self._groups_ready = False
            raise Unavailable(f"the job queue (Redis at {self._where()}) refused a command: {e}") from None

    def _where(self) -> str:
        kw = self._redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}" if "host" in kw else self.url.split("@")[-1]

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        async def create(stream: str) -> None:
            try:
                await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except self._response_error as e:
                if "BUSYGROUP" not in str(e):
                    raise
        await self._call(asyncio.gather(*(create(s) for s in self._streams)))
        self._groups_ready = True

    def _record(self, job_id: str, h: dict[bytes, bytes]) -> JobRecord | None:
        if not h or b"meta" not in h:
            return None
        meta = json.loads(h[b"meta"])
        status = _text(h.get(b"status")) or "queued"
        err = _text(h.get(b"error"))
        rs = _text(h.get(b"result_status"))
        rh = _text(h.get(b"result_headers"))
        return JobRecord(
            id=job_id, model=meta["model"], version=meta["version"], protocol=meta["protocol"],
            body=h.get(b"body", b""), header_length=meta["header_length"], rows=meta["rows"],
            priority=meta["priority"], created=meta["created"], body_hash=meta["body_hash"],
            idempotency_key=meta["idempotency_key"], callback=meta["callback"], status=status,
            started=_float(h.get(b"started")), finished=_float(h.get(b"finished")), expires=_float(h.get(b"expires")),
            served_version=_text(h.get(b"served_version")) or None, error=json.loads(err) if err else None,
            result_status=int(rs) if rs else None, result_headers=json.loads(rh) if rh else {},
            result_body=h.get(b"result_body") if rs else None,
        )

    # --- JobQueue -------------------------------------------------------------------------------

    async def put(self, job: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        await self._ensure_groups()
        r = self._redis
        idem = self._idem(job.model, job.idempotency_key) if job.idempotency_key else None
        if idem is not None:
            for _ in range(3):  # the key's job may expire between the two reads: look again
                if await self._call(r.set(idem, job.id, nx=True)):
                    break
                found_id = _text(await self._call(r.get(idem)))
                found = await self.get(found_id) if found_id else None
                if found is None:
                    await self._call(r.delete(idem))
                    continue
                if found.body_hash != job.body_hash:
                    raise JobConflict(
                        f"Idempotency-Key {job.idempotency_key!r} already names job {found.id} of model "
                        f"{job.model!r}, submitted with a different request"
                    )
                return found, False
            else:
                raise Unavailable("the idempotency key's job kept expiring while it was read; retry")
        try:
            async with r.pipeline(transaction=False) as pipe:
                for s in self._streams:
                    pipe.xlen(s)
                lengths = await self._call(pipe.execute())
            unfinished = sum(lengths)
            if unfinished >= max_queued:
                raise Overloaded(f"the job queue is full ({unfinished} jobs unfinished, at most {max_queued})", retry_after=5.0)
            meta = {k: getattr(job, k) for k in _META}
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(self._job(job.id), mapping={
                    "meta": json.dumps(meta), "status": "queued", "served_version": job.served_version or "",
                })
                pipe.set(self._body_prefix + job.id, job.body)
                pipe.xadd(self._stream(job.priority), {"id": job.id})
                await self._call(pipe.execute())
        except BaseException:
            if idem is not None:
                # Redis may be down: a key left naming no job is replaced by the next submit with it.
                with contextlib.suppress(Exception):
                    await r.delete(idem)
            raise
        return job, True

    async def claim(self, limit: int, wait_s: float) -> list[JobRecord]:
        """Reclaimed entries of dead workers first, then new ones, best priority first."""
        await self._ensure_groups()
        r = self._redis
        started = repr(time.time())
        jobs: list[JobRecord] = []
        now = time.monotonic()
        if now - self._reclaimed_at >= max(0.2, self.claim_timeout_s / 4):
            self._reclaimed_at = now
            for s in self._streams:
                got = await self._call(r.xautoclaim(s, self.group, self.consumer, int(self.claim_timeout_s * 1000), "0-0", count=limit - len(jobs)))
                entries = [(s, eid, fields.get(b"id", b"") if fields else b"") for eid, fields in got[1]]
                if entries:  # an entry trimmed away meanwhile has no fields: the script drops it
                    jobs += await self._read(entries, started)
                if len(jobs) >= limit:
                    return jobs
        # One script reads new entries, best priority first, and marks their jobs running.
        flat = await self._call(self._claim_new(
            keys=self._streams, args=[self.group, self.consumer, limit - len(jobs), started, self._job_prefix],
        ))
        jobs += await self._jobs(flat, started)
        if jobs or wait_s <= 0:
            return jobs
        got = await self._call(r.xreadgroup(
            self.group, self.consumer, {s: ">" for s in self._streams}, count=limit,
            block=max(1, int(min(wait_s, _MAX_BLOCK_S) * 1000)),
        ))
        entries = [(_str(stream), eid, fields.get(b"id", b"") if fields else b"") for stream, items in got or [] for eid, fields in items]
        return await self._read(entries, started) if entries else []

    async def _read(self, entries: list[tuple[str, bytes, bytes]], started: str) -> list[JobRecord]:
        """Take entries already delivered to this consumer (see _CLAIM_READ)."""
        args: list[Any] = [self.group, started, self._job_prefix]
        for entry in entries:
            args += entry
        return await self._jobs(await self._call(self._claim_read(args=args)), started)

    async def _jobs(self, flat: list[Any], started: str) -> list[JobRecord]:
        """The jobs a claim script took ((stream, entry id, job id, meta, served_version) each),
        with their bodies. A body gone meanwhile (the job was deleted, or answered by a worker that
        had been presumed dead) leaves the job empty: it fails to decode, and storing its result
        finds the job forgotten or answered, stores nothing and acknowledges the entry."""
        if not flat:
            return []
        jobs = []
        at = float(started)
        for i in range(0, len(flat), 5):
            stream, eid, jid, meta, served = flat[i:i + 5]
            m = json.loads(meta)
            model, key, callback = m["model"], m["idempotency_key"], m["callback"]
            job = JobRecord(
                jid.decode(), model, m["version"], m["protocol"], b"", m["header_length"], m["rows"],
                m["priority"], m["created"], m["body_hash"], key, callback, "running", at,
                served_version=served.decode() if served else None,
            )
            job.receipt = (stream.decode(), eid, self._idem(model, key) if key else None, bool(callback))
            jobs.append(job)
        bodies = await self._call(self._redis.mget([self._body_prefix + job.id for job in jobs]))
        older = [job for job, body in zip(jobs, bodies) if body is None]
        bodies_in_hash: dict[str, bytes | None] = {}
        if older:  # stored by an older producer (in the hash), or gone
            async with self._redis.pipeline(transaction=False) as pipe:
                for job in older:
                    pipe.hget(self._job_prefix + job.id, "body")
                bodies_in_hash = dict(zip((job.id for job in older), await self._call(pipe.execute())))
        for job, body in zip(jobs, bodies):
            job.body = body if body is not None else bodies_in_hash.get(job.id) or b""
        return jobs

    async def _ack(self, receipts: list[tuple[Any, ...]]) -> None:
        by_stream: dict[str, list[Any]] = {}
        for receipt in receipts:
            by_stream.setdefault(receipt[0], []).append(receipt[1])
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
                pipe.xdel(stream, *ids)
            await self._call(pipe.execute())

    async def complete(self, completions: list[Completion], ttl_s: float) -> list[JobRecord]:
        """Store each result (once per job id) and acknowledge the stream entries, in one script."""
        if not completions:
            return []
        now = time.time()
        ttl_ms = max(1, int(ttl_s * 1000))
        # A claimed job's receipt names its stream entry, its idempotency key and whether it has
        # a callback; a completion without one (not claimed here) has the last two read from the job.
        unknown = [c for c in completions if c.receipt is None]
        metas: dict[str, Any] = {}
        if unknown:
            async with self._redis.pipeline(transaction=False) as pipe:
                for c in unknown:
                    pipe.hget(self._job(c.job_id), "meta")
                metas = {c.job_id: json.loads(m) if m else {} for c, m in zip(unknown, await self._call(pipe.execute()))}
        rows: list[list[Any]] = []
        callbacks: list[bool] = []
        # The jobs of one batch share their headers' dict (see JobRunner): one JSON text for them.
        texts: dict[int, str] = {}
        for c in completions:
            if c.receipt is not None:
                stream, eid, idem, callback = c.receipt
            else:
                meta = metas.get(c.job_id) or {}
                key = meta.get("idempotency_key")
                stream, eid, idem, callback = "", "", self._idem(meta["model"], key) if key else None, bool(meta.get("callback"))
            callbacks.append(callback)
            headers = texts.get(id(c.result_headers))
            if headers is None:
                headers = texts[id(c.result_headers)] = json.dumps(c.result_headers)
            rows.append([c.job_id, c.status, json.dumps(c.error) if c.error else "", c.result_status,
                         headers, c.result_body, c.served_version or "", "" if stream else repr(c.started or now),
                         idem or "", stream, eid])
        stored = await self._call(self._complete(
            keys=[self.stats_key],
            args=[repr(now), ttl_ms, self._job_prefix, self.group, msgpack.packb(rows, use_bin_type=False), self._body_prefix],
        ))
        # Only jobs with a callback are read back (for their final status document).
        notify = [c.job_id for c, ok, callback in zip(completions, stored, callbacks) if ok and callback]
        return [j for j in [await self.get(i) for i in notify] if j is not None]

    async def release(self, jobs: list[JobRecord]) -> None:
        """Queue the jobs again (a new stream entry each), then acknowledge their old entries."""
        if not jobs:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for job in jobs:
                pipe.hset(self._job(job.id), "status", "queued")
                pipe.xadd(self._stream(job.priority), {"id": job.id})
            await self._call(pipe.execute())
        await self._ack([j.receipt for j in jobs if j.receipt is not None])

    async def get(self, job_id: str) -> JobRecord | None:
        h = await self._call(self._redis.hgetall(self._job(job_id)))
        return self._record(job_id, h)

    async def delete(self, job_id: str) -> bool:
        """Forget the job; its stream entry, if still there, is dropped by the worker that reads it."""
        job = await self.get(job_id)
        if job is None:
            return False
        keys = [self._job(job_id), self._body_prefix + job_id]
        if job.idempotency_key:
            idem = self._idem(job.model, job.idempotency_key)
            if _text(await self._call(self._redis.get(idem))) == job_id:
                keys.append(idem)
        return bool(await self._call(self._redis.delete(*keys)))

    async def recover(self) -> int:
        """Nothing to do here: entries a dead worker held are reclaimed by XAUTOCLAIM."""
        return 0

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a client whose server is gone
            await self._redis.aclose()
