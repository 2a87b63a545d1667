//! Rows of the `entries` and `outbox` tables as the storage seam's types.

use bytes::Bytes;
use tokio_postgres::Row;

use super::to_u64;
use crate::tier::{OutboxOp, OutboxRow, StoredEntry};

type Pg = tokio_postgres::Error;

pub(super) fn row_to_entry(r: &Row, offset: usize) -> Result<StoredEntry, Pg> {
    let value: Option<Vec<u8>> = r.try_get(offset)?;
    Ok(StoredEntry::new(
        value.map(Bytes::from),
        r.try_get(offset + 1)?,
        to_u64(r.try_get(offset + 2)?),
        to_u64(r.try_get(offset + 3)?),
        to_u64(r.try_get(offset + 4)?),
    ))
}

pub(super) fn op_of(op: &str, value: Option<Vec<u8>>) -> OutboxOp {
    match op {
        "put" => OutboxOp::Put(value.map(Bytes::from).unwrap_or_default()),
        _ => OutboxOp::Delete,
    }
}

pub(super) fn row_to_outbox(r: &Row) -> Result<OutboxRow, Pg> {
    let op: String = r.try_get(2)?;
    let mut row = OutboxRow::new(
        r.try_get(0)?,
        r.try_get::<_, String>(1)?,
        op_of(&op, r.try_get(3)?),
        to_u64(r.try_get(4)?),
    );
    row.attempts = u32::try_from(r.try_get::<_, i32>(5)?).unwrap_or(0);
    row.next_attempt = to_u64(r.try_get(6)?);
    row.last_error = r.try_get(7)?;
    row.dead = r.try_get(8)?;
    row.superseded = r.try_get(9)?;
    Ok(row)
}
