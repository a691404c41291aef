//! `OUTPOST_BENCH_ONLY=zstd`: compressed ByteStream writes and reads of a
//! compressible blob (`compressed-blobs/zstd/…`), and plain reads of a blob
//! the store keeps compressed beside plain reads of one it keeps raw, all
//! in MB/s of uncompressed data, measured side by side in one run.

use super::*;

/// Text-like bytes (build logs) that zstd level 1 shrinks several times;
/// `seed` varies them.
fn compressible(size: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"warning: unused variable ",
        b"src/compiler/driver.rs:",
        b"note: required by a bound in ",
        b"error[E0308]: mismatched types ",
        b" | ",
        b"\n",
        b"  --> ",
        b"libcore.rlib ",
    ];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(size + 64);
    let mut pick = [0u8; 2];
    while out.len() < size {
        rng.fill(&mut pick);
        out.extend_from_slice(words[(pick[0] % 8) as usize]);
        out.extend_from_slice(pick[1].to_string().as_bytes());
    }
    out.truncate(size);
    out
}

fn compressed_read_name(d: &Digest) -> String {
    format!("compressed-blobs/zstd/{}/{}", d.hash_hex(), d.size)
}

fn compressed_write_name(d: &Digest, n: u64) -> String {
    format!(
        "uploads/6f7574706f73-7a00-4000-8000-{n:012x}/compressed-blobs/zstd/{}/{}",
        d.hash_hex(),
        d.size
    )
}

/// Reads `resource` whole; returns the bytes received.
async fn read_all(
    client: &mut ByteStreamClient<Channel>,
    resource: String,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: resource,
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(response) = stream.next().await {
        out.extend_from_slice(&response?.data);
    }
    Ok(out)
}

/// One row from the samples of `reps`.
fn row(name: String, size: usize, samples: Vec<Sample>, reps: &Reps) -> Row {
    Row {
        name,
        bytes: size as u64,
        ops: 1,
        calls: 1,
        samples,
        noisy: reps.noisy,
    }
}

/// Runs the `zstd` group, appending its rows.
pub async fn bench_compressed(
    settings: &Settings,
    clients: &mut Clients,
    pid: Option<u32>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let size = settings.size_mib << 20;
    eprintln!("generating {} MiB of compressible data…", settings.size_mib);
    let mut data = compressible(size, 7);
    let mut upload = 1u64 << 40;
    let mut last = None;

    // Compressed writes: a new blob every time (an existing one completes
    // early), compressed before the clock starts.
    let mut samples = Vec::new();
    let mut reps = Reps::new(settings, settings.warmup);
    while reps.more() {
        upload += 1;
        data[..8].copy_from_slice(&upload.to_le_bytes());
        let digest = sha256(&data);
        let packed = Arc::new(zstd::bulk::compress(&data, 1)?);
        let watch = Stopwatch::start(pid);
        let name = compressed_write_name(&digest, upload);
        let requests = write_stream(name, packed.clone(), 1 << 20);
        clients
            .bytestream
            .write(requests)
            .await
            .context("compressed ByteStream.Write")?;
        let sample = watch.stop();
        let (keep, note) = reps.judge(&[sample]);
        if keep {
            samples.push(sample);
        }
        eprintln!(
            "  compressed write{note}: {:.0} MB/s of plain data, ratio {:.1} ({})",
            size as f64 / sample.secs / 1e6,
            size as f64 / packed.len() as f64,
            sample.brief()
        );
        last = Some(digest);
    }
    let name = format!(
        "ByteStream.Write zstd {} MiB (plain MB/s)",
        settings.size_mib
    );
    rows.push(row(name, size, samples, &reps));
    let digest = match last {
        Some(d) => d,
        None => return Ok(()),
    };

    // Compressed reads of the blob just written (kept as sent).
    let mut samples = Vec::new();
    let mut reps = Reps::new(settings, settings.warmup.max(1));
    while reps.more() {
        let verify = reps.seen == 0;
        let watch = Stopwatch::start(pid);
        let packed = read_all(&mut clients.bytestream, compressed_read_name(&digest))
            .await
            .context("compressed ByteStream.Read")?;
        let sample = watch.stop();
        if verify {
            let plain = zstd::bulk::decompress(&packed, size)?;
            ensure!(
                sha256(&plain) == digest,
                "compressed read returned other bytes"
            );
        }
        let (keep, note) = reps.judge(&[sample]);
        if keep {
            samples.push(sample);
        }
        eprintln!(
            "  compressed read{note}: {:.0} MB/s of plain data ({})",
            size as f64 / sample.secs / 1e6,
            sample.brief()
        );
    }
    let name = format!(
        "ByteStream.Read zstd {} MiB (plain MB/s)",
        settings.size_mib
    );
    rows.push(row(name, size, samples, &reps));

    // Plain reads: the blob stored compressed, beside one stored raw.
    let mut raw = vec![0u8; size];
    Rng::new(8).fill(&mut raw);
    let raw_digest = sha256(&raw);
    super::bytestream_write(
        &mut clients.bytestream,
        &raw_digest,
        Arc::new(raw),
        1 << 20,
        upload + 1,
    )
    .await?;
    for (what, d) in [("stored zstd", &digest), ("stored raw", &raw_digest)] {
        let mut samples = Vec::new();
        let mut reps = Reps::new(settings, settings.warmup.max(1));
        while reps.more() {
            let verify = reps.seen == 0;
            let watch = Stopwatch::start(pid);
            super::bytestream_read(&mut clients.bytestream, d, verify)
                .await
                .with_context(|| format!("ByteStream.Read, {what}"))?;
            let sample = watch.stop();
            let (keep, note) = reps.judge(&[sample]);
            if keep {
                samples.push(sample);
            }
            eprintln!(
                "  plain read, {what}{note}: {:.0} MB/s ({})",
                size as f64 / sample.secs / 1e6,
                sample.brief()
            );
        }
        let name = format!("ByteStream.Read {} MiB, {what}", settings.size_mib);
        rows.push(row(name, size, samples, &reps));
    }
    Ok(())
}
