-- 0013: the writer may send some of append_events' arrays packed, each as one text.
--
-- The group commit sends sixteen arrays per call, with an element per append or per event in
-- each. The driver (asyncpg) encodes every element on its own in the writer's process, after
-- type checks that no codec setting skips; the writer shares the machine's cores with the
-- server. Joined into one text (by the unit separator, U+001F), an array costs the writer a
-- string join, and the server a split and the element type's input function. Measured per
-- element, on one connection with 150 appends per call (local PostgreSQL 15, 2 cores), as the
-- writer's CPU encoding the binary array against the server's CPU unpacking the text:
--   * a short text 0.46 µs against under 0.1 µs more than receiving it in binary; an event's
--     JSON 0.53 against nothing measurable; the job's state (about 900 bytes) 0.73 against 0.22;
--   * a timestamp 1.15 µs against 0.35, and 0.4 in the writer to make its epoch microseconds
--     (parsing ISO text instead would cost the server 1.0 µs);
--   * a hash 0.47 µs against about 0.1 more than in binary;
--   * but a UUID 0.30 µs against 0.33 to 0.44, and an integer 0.29 against about 0.1 more:
--     the ids and the numbers stay binary arrays.
-- In a closed loop of 1,000 jobs (three interleaved pairs) the writer spent 31.3 to 31.5 µs of
-- CPU per append against 34.8 to 36.8 with every array binary, and the rest of the machine 51.7
-- to 52.6 µs against 50.7 to 52.3: about 4 µs less per append in all. The rate did not change
-- beyond this machine's noise; the writer's process has that much more CPU for its own work.
--
-- The writer packs a text only if it holds no separator. JSON it encoded holds none (a control
-- character in a JSON string is always escaped); a project, an owner or an actor might, and a
-- call with one goes as arrays. See append_events_packed in services/common/queries.sql.


-- The elements of one packed text. A batch is never empty, so '' is one empty element (which
-- string_to_array would make no element at all); elements equal to null_as are NULL.
CREATE FUNCTION unpack_fields(packed text, null_as text DEFAULT NULL) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN packed = '' THEN ARRAY[nullif('', null_as)]
                ELSE string_to_array(packed, E'\x1f', null_as) END;


-- Packed epoch microseconds as timestamps, exactly, for any time a writer can send (years 1 to
-- 9999): whole seconds converted by to_timestamp (a whole number of seconds times 10^6 stays
-- exact in a double up to 5.7e11 s), the remaining microseconds added as an interval.
CREATE FUNCTION unpack_micros(packed text) RETURNS timestamptz[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    -- plpgsql, not sql: a subquery keeps a sql function from being inlined, and a sql function
    -- that is not inlined is planned again in every statement that calls it.
    AS $$
BEGIN
    RETURN ARRAY(SELECT to_timestamp(m.micros / 1000000)
                        + (m.micros % 1000000) * interval '1 microsecond'
                   FROM unnest(unpack_fields(packed)::bigint[]) WITH ORDINALITY AS m(micros, n)
                  ORDER BY m.n);
END
$$;
