//! The replication protocol decoders: backend message framing and decoding
//! (what `Connection::next_message` does), the BASE_BACKUP reply state
//! machine, and START_REPLICATION's XLogData and keepalive messages. The
//! first input byte chooses the server generation (bit 0: PostgreSQL 15+);
//! the rest is what the server would send.
use bytes::BytesMut;
use walvault::pg::BackendMessage;
use walvault::pg::basebackup::BaseBackupDecoder;
use walvault::pg::conn::decode_message;
use walvault::pg::streamer::ReplicationMessage;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, stream)) = data.split_first() else { return };
        let mut buf = BytesMut::from(stream);
        let mut backup = Some(BaseBackupDecoder::new(mode & 1 == 1));
        while let Ok(Some(msg)) = decode_message(&mut buf) {
            if let BackendMessage::CopyData(d) = &msg {
                let _ = ReplicationMessage::decode(d.clone());
            }
            if let Some(dec) = backup.as_mut() {
                if dec.feed(msg).is_err() {
                    backup = None;
                } else {
                    let _ = dec.take_pending();
                    let _ = dec.is_done();
                }
            }
        }
    });
}
