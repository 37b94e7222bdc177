"""The eSCL (AirScan) front-end: the HTTP server (:mod:`.server`), its XML
documents (:mod:`.documents`) and the mDNS announcements (:mod:`.mdns`)."""
