//! ErrorResponse and NoticeResponse bodies: the server's error as a
//! `PgError::Server`, and notices (which may arrive at any time, e.g.
//! PostgreSQL 18's MD5 deprecation warning) as log lines.

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

use super::PgError;

#[derive(Debug, Default)]
pub struct ServerMessage {
    /// Not localized (the `V` field, PostgreSQL 9.6+), else the localized one.
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerMessage {
    pub fn parse(mut fields: ErrorFields<'_>) -> Result<ServerMessage, PgError> {
        let mut m = ServerMessage::default();
        let mut localized_severity = String::new();
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' => localized_severity = value,
                b'V' => m.severity = value,
                b'C' => m.code = value,
                b'M' => m.message = value,
                b'D' => m.detail = Some(value),
                b'H' => m.hint = Some(value),
                _ => {}
            }
        }
        if m.severity.is_empty() {
            m.severity = localized_severity;
        }
        Ok(m)
    }

    pub fn into_error(self) -> PgError {
        PgError::Server { code: self.code, message: self.message, detail: self.detail, hint: self.hint }
    }

    /// Logs a NoticeResponse: warnings as warnings, the rest as info.
    pub fn log(&self) {
        let detail = self.detail.as_deref().unwrap_or("");
        let hint = self.hint.as_deref().unwrap_or("");
        if self.severity == "WARNING" {
            tracing::warn!(sqlstate = %self.code, detail, hint, "PostgreSQL: {}", self.message);
        } else {
            tracing::info!(severity = %self.severity, sqlstate = %self.code, detail, hint, "PostgreSQL: {}", self.message);
        }
    }
}
