-- 0010: the index of event types leaves out progress events.
--
-- events_type_position (0004) serves auditors who filter by type: it lets a page of a rare
-- type (failed, cancelled, download-started) be read without walking the whole log. Progress
-- events are most of the log, and an index entry for each one serves nobody: a filter on
-- export:progress finds its rows close together in position order, so walking the primary key
-- and skipping the others is as fast as walking an index of them. Every append of a progress
-- event paid for that entry all the same, under the append lock.
--
-- Measured with bench/appends.py's closed loop of 1,000 jobs (one progress event per append,
-- three interleaved pairs): WAL per append fell from 2,263-2,274 bytes to 2,153-2,160; the
-- difference in CPU per append was within the machine's noise. On a log of mostly progress
-- events the index holds a small part of the entries it held.
--
-- services/common/audit.py adds "type <> 'export:progress'" to a query whose type filter leaves
-- progress out, which lets the planner use this partial index whatever the parameters; a filter
-- that includes progress walks the primary key.
--
-- Building the index locks appends out for as long as it takes. On a large log, create it
-- beforehand with CREATE INDEX CONCURRENTLY under the same name; IF NOT EXISTS then skips it,
-- and this migration only drops the old index.

CREATE INDEX IF NOT EXISTS events_type_position_sparse ON events (type, position)
    WHERE type <> 'export:progress';
DROP INDEX IF EXISTS events_type_position;
