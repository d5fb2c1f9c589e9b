-- An outpost's link profile for metered networks (heartbeat, delivery
-- bandwidth cap, delivery windows and their time zone), as the JSON of
-- trellis_model::link_profile::LinkProfile; NULL means the hub's defaults.
ALTER TABLE outposts ADD COLUMN link_profile TEXT;
