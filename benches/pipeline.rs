//! Seal and open throughput (MB/s) at zstd levels 1 and 3 on PostgreSQL-like
//! data: heap pages shaped like pgbench_accounts (page header, line pointers,
//! tuples of int4s and blank-padded filler). Also the backup path: a batch of
//! 64 KiB chunks hashed, compressed one by one and sealed as one blob.
//! The data is written to target/bench-pages.bin so that scripts/bench.sh can
//! run `zstd -b1`/`zstd -b3` on the very same bytes.

use std::collections::HashMap;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use walvault::pipeline::{Expected, Opener, Sealer};
use walvault::repo::chunk::{CHUNK_SIZE, ChunkId, CvKey, PendingChunk, process_batch};

const SIZE: usize = 16 << 20;

/// Heap pages like pgbench_accounts: 61 tuples of 121 bytes per 8 KiB page.
pub fn pgbench_pages(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut aid: u32 = 1;
    while out.len() < size {
        let mut page = vec![0u8; 8192];
        page[0..8].copy_from_slice(&(0x1_6A00_0028u64 + aid as u64).to_le_bytes()); // LSN
        page[12..14].copy_from_slice(&268u16.to_le_bytes()); // pd_lower
        page[14..16].copy_from_slice(&888u16.to_le_bytes()); // pd_upper
        page[16..18].copy_from_slice(&8192u16.to_le_bytes());
        page[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
        let mut upper = 8192;
        for i in 0..61 {
            upper -= 121 + 7; // MAXALIGN
            let lp = 24 + i * 4;
            page[lp..lp + 4].copy_from_slice(&(((121u32) << 17) | (1 << 15) | upper as u32).to_le_bytes());
            let t = &mut page[upper..upper + 121];
            t[0..4].copy_from_slice(&(700 + aid / 1000).to_le_bytes()); // xmin
            t[18..20].copy_from_slice(&3u16.to_le_bytes());
            t[20..22].copy_from_slice(&0x0902u16.to_le_bytes());
            t[22] = 24;
            t[24..28].copy_from_slice(&aid.to_le_bytes());
            t[28..32].copy_from_slice(&(aid / 100_000 + 1).to_le_bytes());
            t[32..36].copy_from_slice(&0u32.to_le_bytes());
            t[36] = 0xAB; // varlena header of the filler
            t[37..121].fill(b' ');
            aid += 1;
        }
        out.extend_from_slice(&page);
    }
    out.truncate(size);
    out
}

fn keys() -> (Sealer, Opener) {
    let id = age::x25519::Identity::generate();
    (Sealer::new(vec![id.to_public()], 3).unwrap(), Opener::new(vec![id]).unwrap())
}

fn bench(c: &mut Criterion) {
    let data = pgbench_pages(SIZE);
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-pages.bin", &data);
    let (_, opener) = keys();
    let recipient = opener.recipients();

    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(10);
    for level in [1, 3] {
        let sealer = Sealer::new(recipient.clone(), level).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(format!("zstd{level}")), &data, |b, d| {
            b.iter(|| black_box(sealer.seal_bytes(d).unwrap()))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("open");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(10);
    for level in [1, 3] {
        let sealer = Sealer::new(recipient.clone(), level).unwrap();
        let (stored, summary) = sealer.seal_bytes(&data).unwrap();
        let exp = Expected { stored_hash: Some(summary.stored_hash), plain_hash: Some(summary.plain_hash), plain_len: Some(SIZE as u64) };
        eprintln!("zstd {level}: ratio {:.1}x", SIZE as f64 / stored.len() as f64);
        group.bench_with_input(BenchmarkId::from_parameter(format!("zstd{level}")), &stored, |b, s| {
            b.iter(|| black_box(opener.open_bytes(s, &exp).unwrap()))
        });
    }
    group.finish();

    // The backup path: 1 MiB batches of 64 KiB chunks (ids, chaining values, frames, one blob).
    let mut group = c.benchmark_group("backup_batch");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(10);
    let known: HashMap<ChunkId, ()> = HashMap::new();
    for level in [1, 3] {
        let sealer = Sealer::new(recipient.clone(), level).unwrap();
        let bytes = Bytes::from(data.clone());
        group.bench_function(BenchmarkId::from_parameter(format!("zstd{level}")), |b| {
            b.iter(|| {
                for (n, batch) in bytes.chunks(1 << 20).enumerate() {
                    let chunks = batch
                        .chunks(CHUNK_SIZE)
                        .enumerate()
                        .map(|(i, c)| PendingChunk {
                            data: bytes.slice_ref(c),
                            file_offset: ((n << 20) + i * CHUNK_SIZE) as u64,
                            whole_file: false,
                        })
                        .collect();
                    black_box(process_batch(chunks, &CvKey::new(&[9u8; 32]), &known, &sealer).unwrap());
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
