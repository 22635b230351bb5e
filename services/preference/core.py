"""Preference core: the LLM encoder, loaded lazily once per process."""

from __future__ import annotations

from threading import Lock


class PreferenceCore:
    def __init__(self, encoder_factory):
        self._factory = encoder_factory
        self._encoder = None
        self._lock = Lock()  # one generation at a time per encoder: no state crosses users

    @property
    def encoder(self):
        with self._lock:
            if self._encoder is None:
                self._encoder = self._factory()
        return self._encoder

    def encode(self, captions, target: str = "", method: str = "pmg"):
        encoder = self.encoder
        with self._lock:
            return encoder.encode(list(captions), target=target, method=method)
