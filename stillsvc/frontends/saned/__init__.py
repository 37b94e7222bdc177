"""The SANE network protocol front-end: what libsane's ``net`` backend talks to
(:mod:`.server`), the wire encoding (:mod:`.protocol`) and a device's items as
SANE options (:mod:`.options`)."""
