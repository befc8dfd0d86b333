-- 0005: retention. The archive of a completed export expires EXPORT_ARCHIVE_RETENTION after the
-- export completed: the retention sweeper (services/export/retention.py) appends
-- 'export:archive-expired' to the job and then deletes the file. Events themselves are kept.
--
-- The sweeper looks for completed jobs whose archive has not expired yet, oldest first. This
-- partial index holds exactly those jobs, so it stays as small as the set of archives on disk
-- (a job leaves it when its archive-expired event is appended), and a sweep reads only the head
-- of it. It is ordered by created_at, the database's own clock: a job completes after it was
-- created, so "created before the cutoff" bounds the scan and the completion time in the state
-- (finishedAt) is checked on the few rows it returns.
CREATE INDEX jobs_archive_live ON jobs (created_at, job_id)
    WHERE status = 'completed' AND (state ->> 'archiveExpired') IS DISTINCT FROM 'true';
