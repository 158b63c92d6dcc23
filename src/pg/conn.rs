//! A PostgreSQL connection speaking the simple-query and COPY sub-protocols, in
//! physical replication mode or as a normal database session.
//! PLACEHOLDER: implemented by the pg-client work.

use bytes::Bytes;

use super::conninfo::ConnParams;
use super::{Lsn, PgError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Replication,
    Database,
}

#[derive(Debug, Clone, Default)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

#[derive(Debug, Clone, Copy)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: u32,
    pub xlogpos: Lsn,
}

#[derive(Debug)]
pub enum BackendMessage {
    CopyData(Bytes),
    CopyDone,
    CopyOutResponse,
    CopyBothResponse,
    CopyInResponse,
    RowDescription(Vec<String>),
    DataRow(Vec<Option<Bytes>>),
    CommandComplete(String),
    EmptyQueryResponse,
    ReadyForQuery,
    Error(PgError),
}

pub struct Connection {}

impl Connection {
    pub async fn connect(params: &ConnParams, mode: Mode) -> Result<Connection, PgError> {
        let _ = (params, mode);
        todo!("pg client")
    }
    pub fn server_version_num(&self) -> u32 {
        todo!()
    }
    pub fn parameter(&self, _name: &str) -> Option<&str> {
        todo!()
    }
    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        todo!()
    }
    pub async fn show(&mut self, _name: &str) -> Result<String, PgError> {
        todo!()
    }
    pub async fn simple_query(&mut self, _sql: &str) -> Result<Vec<ResultSet>, PgError> {
        todo!()
    }
    pub async fn send_query(&mut self, _sql: &str) -> Result<(), PgError> {
        todo!()
    }
    pub async fn next_message(&mut self) -> Result<BackendMessage, PgError> {
        todo!()
    }
    pub async fn send_copy_data(&mut self, _data: &[u8]) -> Result<(), PgError> {
        todo!()
    }
    pub async fn send_copy_done(&mut self) -> Result<(), PgError> {
        todo!()
    }
    pub async fn flush(&mut self) -> Result<(), PgError> {
        todo!()
    }
    pub async fn close(self) {}
}
