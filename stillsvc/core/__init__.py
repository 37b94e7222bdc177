"""The core: devices, sessions, locks, items, transfers, event routing. No transport in here."""
