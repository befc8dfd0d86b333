-- 0011: append_events has the kernel write out the data pages it evicts as it goes.
--
-- An append commits only once its WAL is on disk (an fdatasync), and it does so holding the
-- append lock (events_serialize_appends), so every append behind it waits for that sync too.
-- The log's tables and indexes grow by every append, and a server whose shared_buffers are
-- smaller than what is written between two checkpoints evicts dirty pages from the appending
-- backend itself. With PostgreSQL's default backend_flush_after of 0 those writes sit in the
-- kernel's page cache until its writeback flushes them in one burst (every few seconds, up to
-- 260 MB at a time on the machine of the README's figures). A WAL sync issued during that burst
-- waits behind it: one took 140 ms, and the appends queued at the lock waited as long.
--
-- With backend_flush_after set, the backend asks the kernel to start writing what it evicted
-- after every 256 kB, so the page cache holds half as much waiting to be written (about 130 MB
-- at most in the same runs; what is left is mostly the zeroed pages of each extension of a
-- table or index, which PostgreSQL does not track) and the bursts are smaller. Measured with
-- 1,000 jobs appending 15,000 events/s in all for 20 s, after 35 s of appending (interleaved,
-- local PostgreSQL 15, 2 cores): p99 from when each append was due 28-112 ms (median of four
-- 63) against 97-158 ms (median of six 113) without it; p50 unchanged.
--
-- Set on the function rather than on the server so that it holds wherever the log is deployed;
-- deploy/README.md recommends the same setting server-wide.

ALTER FUNCTION append_events(uuid[], integer[], integer[], text[], text[], text[], text[],
                             integer[], uuid[], text[], text[], text[], timestamptz[],
                             integer[], bytea[], bytea[], boolean)
    SET backend_flush_after = '256kB';
