"""stillsvc: the still-image service for Linux.

One daemon owns every scanner and camera on a machine, arbitrates who may talk to
each device (status mode, data mode, the short-term device lock), routes every
button press to exactly one consumer, and exposes all of it over D-Bus.
"""

__version__ = "0.1.0"
