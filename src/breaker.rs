//! The circuit breaker (being written).
