-- `trellis stop component --kill`: a stop without the grace period. Kept
-- as a standing state beside `stopped` (not an event), so an agent that
-- hears of the stop late still kills rather than stops.
--
-- Portable to PostgreSQL: ADD COLUMN with a constant default.

ALTER TABLE component_controls ADD COLUMN killed BOOLEAN NOT NULL DEFAULT FALSE;
