"""The OpenAPI 3.1 description of the serving API, answered at ``GET /openapi.json`` (docs/serving.md is the prose).

>>> sorted(openapi(max_request_bytes=1024, max_items=10)["paths"])
['/healthz', '/metrics', '/score']
"""

from __future__ import annotations

from typing import Any

from streamer.events import TS_MAX_MS

_ERROR = {"$ref": "#/components/schemas/Error"}
_REJECTED = {
    "type": ["object", "null"], "required": ["version", "reason", "detail", "at"],
    "description": "the last publication refused since the replica started (null: none)",
    "properties": {
        "version": {"type": ["integer", "null"], "description": "null for a message without a version"},
        "reason": {"type": "string",
                   "description": "a wire code, bad_model or non_finite_weights (docs/serving.md, Rejections)"},
        "detail": {"type": "string", "description": "what was wrong, as logged"},
        "at": {"type": "number", "description": "when, s since the Unix epoch"},
    },
}
_HEALTH = {
    "type": "object",
    "required": ["status", "model_version", "step", "tasks", "loaded_at", "rejections_since_load", "last_rejection"],
    "properties": {
        "status": {"const": "ok"},
        "model_version": {"type": "integer", "description": "the version served"},
        "step": {"type": ["integer", "null"], "description": "the trainer's step of that version"},
        "tasks": {"type": "array", "items": {"type": "string"}},
        "loaded_at": {"type": "number", "description": "when it was loaded, s since the Unix epoch"},
        "rejections_since_load": {"type": "integer", "minimum": 0, "description": "publications refused since that "
                                  "load (since the start when none is loaded; a corrupt chunk counts at least twice)"},
        "last_rejection": _REJECTED,
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
            for status in statuses}


def openapi(max_request_bytes: int, max_items: int) -> dict[str, Any]:
    """The document, with this server's limits in it."""
    impression = {
        "type": "object", "additionalProperties": False,
        "required": ["impression_id", "ts_ms", "user_id", "item_id", "features"],
        "properties": {
            "v": {"const": 1},
            "impression_id": {"type": "string", "minLength": 1, "maxLength": 1024},
            "ts_ms": {"type": "integer", "minimum": 0, "maximum": TS_MAX_MS,
                      "description": "event time, ms since the Unix epoch (up to year 9999)"},
            "user_id": {"type": "string", "minLength": 1, "maxLength": 1024},
            "item_id": {"type": "string", "minLength": 1, "maxLength": 1024},
            "features": {"type": "object", "maxProperties": 256,
                         "additionalProperties": {"type": ["string", "integer", "number"]},
                         "description": "the served model's numeric features must be JSON numbers (finite)"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "crossdistil serve", "version": "1",
                 "description": "Scores impressions with the latest published model (docs/serving.md)."},
        "paths": {
            "/score": {"post": {
                "summary": "probabilities per task for a list of impressions, in request order",
                "requestBody": {"required": True, "description": f"at most {max_request_bytes} bytes, UTF-8",
                                "content": {"application/json": {"schema": {
                                    "type": "array", "minItems": 1, "maxItems": max_items, "items": impression}}}},
                "responses": {
                    "200": {"description": "scored", "content": {"application/json": {"schema": {
                        "type": "object",
                        "required": ["model_version", "step", "tasks", "impression_ids", "probabilities"],
                        "properties": {
                            "model_version": {"type": "integer"}, "step": {"type": ["integer", "null"]},
                            "tasks": {"type": "array", "items": {"type": "string"}},
                            "impression_ids": {"type": "array", "items": {"type": "string"}},
                            "probabilities": {"type": "object", "additionalProperties": {
                                "type": "array", "items": {"type": "number"}}},
                        }}}}},
                    **_errors(400, 405, 408, 411, 413, 414, 415, 431, 500, 503),
                },
            }},
            "/healthz": {"get": {
                "summary": "ready once a model is loaded; says which, and the publications refused since",
                "description": "200 while a model is served, even when newer publications are refused (the replica "
                               "serves its last good model); `last_rejection` and `rejections_since_load` say so. "
                               "The 503 `no_model` body carries the same two fields.",
                "responses": {
                    "200": {"description": "ready", "content": {"application/json": {"schema": _HEALTH}}},
                    **_errors(503)}}},
            "/metrics": {"get": {"summary": "Prometheus text (OpenMetrics by Accept)", "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string", "description": "a code (docs/serving.md)"},
                           "message": {"type": "string"}, "index": {"type": "integer"},
                           "field": {"type": "string"}}}}},
    }
