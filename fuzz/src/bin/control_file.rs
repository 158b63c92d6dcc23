//! pg_control as read from a base backup (next xid).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = walvault::pg::basebackup::control_file_next_xid(data, walvault_fuzz::SYSTEM_IDENTIFIER);
    });
}
