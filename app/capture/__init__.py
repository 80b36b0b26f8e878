"""Capture: every model call, run and template, persisted as training data (see store.py)."""

from app.capture.records import (AgentStats, CallRecord, RunRecord, TemplateRecord, new_id, request_payload,
                                 response_payload)
from app.capture.store import CaptureStore

__all__ = ["AgentStats", "CallRecord", "CaptureStore", "RunRecord", "TemplateRecord", "new_id", "request_payload",
           "response_payload"]
