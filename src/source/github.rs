//! GitHub source (being written).
