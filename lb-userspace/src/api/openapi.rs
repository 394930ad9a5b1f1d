//! The OpenAPI 3 document served at `/v1/openapi.json`. [`OPERATIONS`] lists every route the
//! router serves; a test checks the document and the router against each other.

use axum::Json;
use serde_json::{Value, json};

/// (method, path) of every operation, as the router registers it.
pub const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/v1/status"),
    ("get", "/v1/services"),
    ("get", "/v1/pools"),
    ("post", "/v1/pools/{pool}/backends"),
    ("delete", "/v1/pools/{pool}/backends/{address}"),
    ("put", "/v1/pools/{pool}/backends/{address}/weight"),
    ("put", "/v1/pools/{pool}/backends/{address}/state"),
    ("get", "/v1/firewall"),
    ("post", "/v1/reload"),
    ("get", "/v1/openapi.json"),
    ("get", "/metrics"),
];

fn error_responses() -> Value {
    json!({
        "400": { "description": "Invalid input; the message says what and how to fix it. Nothing changed.", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
        "401": { "description": "Missing or wrong bearer token. Nothing changed." },
        "404": { "description": "No such pool or backend (POST /v1/reload: lbd runs without a configuration file). Nothing changed.", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
        "405": { "description": "The path exists, not with this method. Nothing changed." },
        "409": { "description": "The backend exists already, or the configuration file was edited since lbd last read it (reload it first). Nothing changed.", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
        "500": { "description": "Internal error; the cause is in the daemon's log." }
    })
}

fn change_response(status: &str) -> Value {
    let mut responses = error_responses();
    responses[status] = json!({ "description": "Applied and written back to the configuration file (a change asking for what is already so: nothing applied, nothing written).", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ChangeResult" } } } });
    responses
}

fn pool_param() -> Value {
    json!({ "name": "pool", "in": "path", "required": true, "schema": { "type": "string" } })
}

fn address_params() -> Value {
    json!([
        pool_param(),
        { "name": "address", "in": "path", "required": true, "schema": { "type": "string", "format": "ip" } },
        { "name": "port", "in": "query", "required": false, "description": "The backend's port, when several backends share the address (0: the one without a port).", "schema": { "type": "integer", "minimum": 0, "maximum": 65535 } }
    ])
}

/// The document.
#[must_use]
pub fn document_value() -> Value {
    let ok = |schema: Value| {
        json!({
            "200": { "description": "OK", "content": { "application/json": { "schema": schema } } },
            "400": { "description": "A query string (these take none).", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            "401": { "description": "Missing or wrong bearer token." },
            "405": { "description": "The path exists, not with this method." },
            "500": { "description": "A map could not be read; the cause is in the daemon's log." }
        })
    };
    json!({
        "openapi": "3.0.3",
        "info": { "title": "lbd", "version": env!("CARGO_PKG_VERSION"), "description": "The load balancer daemon's API. Every request carries `Authorization: Bearer <token>` when a token file is configured." },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "properties": { "error": { "type": "string" } }, "required": ["error"] },
                "ChangeResult": { "type": "object", "properties": {
                    "services_added": { "type": "integer" }, "services_updated": { "type": "integer" }, "services_removed": { "type": "integer" },
                    "tables_installed": { "type": "integer" }, "backends_added": { "type": "integer" }, "backends_retired": { "type": "integer" },
                    "pending_restart": { "type": "array", "items": { "type": "string" }, "description": "settings the reloaded file changes that take effect when lbd restarts" } } },
                "Status": { "type": "object", "properties": {
                    "version": { "type": "string" }, "interfaces": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "mode": { "type": "string" } } } },
                    "services": { "type": "integer" }, "pools": { "type": "integer" }, "backends": { "type": "integer" },
                    "conntrack_entries": { "type": "integer" }, "conntrack_capacity": { "type": "integer" }, "pinned": { "type": "boolean" } } },
                "Service": { "type": "object", "properties": {
                    "name": { "type": "string" }, "address": { "type": "string" }, "protocol": { "type": "string", "enum": ["tcp", "udp"] },
                    "port": { "type": "integer", "nullable": true }, "pool": { "type": "string" }, "mode": { "type": "string", "enum": ["nat", "dsr-l2", "tls-passthrough"] },
                    "packets": { "type": "integer" }, "bytes": { "type": "integer" }, "new_flows": { "type": "integer" } } },
                "Backend": { "type": "object", "properties": {
                    "address": { "type": "string" }, "port": { "type": "integer", "nullable": true }, "weight": { "type": "integer" },
                    "effective_weight": { "type": "integer", "description": "The weight installed: 0 when draining, disabled or down; lower during slow start." },
                    "state": { "type": "string", "enum": ["active", "draining", "disabled"] }, "state_secs": { "type": "integer" },
                    "healthy": { "type": "boolean", "nullable": true, "description": "null when the pool has no health check, or the backend is disabled (not checked)." },
                    "last_check_error": { "type": "string", "nullable": true },
                    "packets": { "type": "integer" }, "bytes": { "type": "integer" }, "new_flows": { "type": "integer" }, "active_flows": { "type": "integer" },
                    "removed": { "type": "boolean", "description": "Removed from the pool, its flows going on (draining, weights 0) until they end or the pool's drain deadline cuts them." } } },
                "Pool": { "type": "object", "properties": { "name": { "type": "string" }, "panic": { "type": "boolean" }, "backends": { "type": "array", "items": { "$ref": "#/components/schemas/Backend" } } } },
                "NewBackend": { "type": "object", "additionalProperties": false, "required": ["address"], "properties": {
                    "address": { "type": "string" }, "port": { "type": "integer", "minimum": 1, "maximum": 65535, "nullable": true }, "weight": { "type": "integer", "minimum": 0, "maximum": 65535, "nullable": true } } },
                "Weight": { "type": "object", "additionalProperties": false, "required": ["weight"], "properties": { "weight": { "type": "integer", "minimum": 0, "maximum": 65535 } } },
                "Firewall": { "type": "object", "properties": {
                    "enabled": { "type": "boolean" }, "default": { "type": "string", "enum": ["allow", "deny"] }, "audit": { "type": "boolean" },
                    "generation": { "type": "integer", "nullable": true },
                    "rules": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "action": { "type": "string", "enum": ["allow", "deny", "rate_limit"] }, "packets": { "type": "integer" }, "bytes": { "type": "integer" } } } },
                    "default_packets": { "type": "integer" }, "default_bytes": { "type": "integer" }, "audit_would_drop": { "type": "integer" },
                    "source_prefixes": { "type": "integer" }, "destination_prefixes": { "type": "integer" } } },
                "StateChange": { "type": "object", "additionalProperties": false, "required": ["state"], "properties": { "state": { "type": "string", "enum": ["active", "draining", "disabled"] } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/status": { "get": { "summary": "Interfaces, counts and connection-table occupancy.", "responses": ok(json!({ "$ref": "#/components/schemas/Status" })) } },
            "/v1/services": { "get": { "summary": "Services with their traffic counters.", "responses": ok(json!({ "type": "array", "items": { "$ref": "#/components/schemas/Service" } })) } },
            "/v1/pools": { "get": { "summary": "Pools and their backends with weights and counters.", "responses": ok(json!({ "type": "array", "items": { "$ref": "#/components/schemas/Pool" } })) } },
            "/v1/pools/{pool}/backends": { "post": {
                "summary": "Add a backend to a pool.", "parameters": [pool_param()],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/NewBackend" } } } },
                "responses": change_response("201") } },
            "/v1/pools/{pool}/backends/{address}": { "delete": {
                "summary": "Remove a backend from a pool. It drains first: its established flows continue until they end or the pool's drain_timeout_secs passes.",
                "parameters": address_params(), "responses": change_response("200") } },
            "/v1/pools/{pool}/backends/{address}/weight": { "put": {
                "summary": "Set a backend's weight (0: no new flows; established flows continue).",
                "parameters": address_params(),
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Weight" } } } },
                "responses": change_response("200") } },
            "/v1/pools/{pool}/backends/{address}/state": { "put": {
                "summary": "Set a backend's state: active; draining (no new flows, established ones kept until they end or the pool's drain_timeout_secs); disabled (no flows at all, established ones cut).",
                "parameters": address_params(),
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StateChange" } } } },
                "responses": change_response("200") } },
            "/v1/firewall": { "get": { "summary": "The firewall: policy, audit mode, active generation, per-rule hit counters, default-policy and would-drop counters, prefix counts.", "responses": ok(json!({ "$ref": "#/components/schemas/Firewall" })) } },
            "/v1/reload": { "post": { "summary": "Re-read the configuration file and apply it (rejected files change nothing).", "responses": change_response("200") } },
            "/v1/openapi.json": { "get": { "summary": "This document.", "responses": { "200": { "description": "OK", "content": { "application/json": { "schema": { "type": "object" } } } }, "400": { "description": "A query string (this endpoint takes none)." }, "401": { "description": "Missing or wrong bearer token." } } } },
            "/metrics": { "get": { "summary": "Metrics: OpenMetrics 1.0 when Accept asks for it, else the Prometheus text format 0.0.4.", "responses": { "200": { "description": "OK", "content": { "application/openmetrics-text": {}, "text/plain": {} } }, "401": { "description": "Missing or wrong bearer token." } } } }
        }
    })
}

/// `GET /v1/openapi.json`.
pub async fn document(_: super::NoQuery) -> Json<Value> {
    Json(document_value())
}
