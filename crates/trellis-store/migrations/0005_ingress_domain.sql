-- The DNS name an outpost's ingresses are reachable under; NULL means the
-- default (`localhost`).
ALTER TABLE outposts ADD COLUMN ingress_domain TEXT;
