//! Stats (being written).
