//! The offline teacher cache gives the loss of the live teacher (reduced to the same top-k)
//! on the same batch, and refuses files that do not belong to the run.

use burn::tensor::{Device, Int, Tensor, TensorData};
use distill::cache::TeacherCache;
use distill::{CausalLm, Divergence, LossSpec, Teacher};
use model::Checkpoint;
use model::testkit::{Rng, tiny_config, write_hf};
use model::transformer::Rope;

const SEQ: usize = 16;

fn windows(n: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng(5);
    (0..n)
        .map(|_| {
            (0..=SEQ)
                .map(|_| ((rng.next() + 1.0) * 149.0) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn cached_loss_equals_the_live_teachers_and_foreign_caches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("t"), &tiny_config(), 1, |_, _| {});
    write_hf(&dir.path().join("s"), &tiny_config(), 2, |_, _| {});
    let tck = Checkpoint::open(&dir.path().join("t")).unwrap();
    let sck = Checkpoint::open(&dir.path().join("s")).unwrap();
    let w = windows(5);
    let (k, temp) = (12, 2.0);
    let path = dir.path().join("cache.bin");
    TeacherCache::write(&tck, &w, k, temp, &path, Device::flex(), |_, _| {}).unwrap();
    let cache = TeacherCache::load(&path).unwrap();
    cache.check_run(&path, &w, 300, temp).unwrap();

    let device = Device::flex();
    let rope = Rope::new(tck.config(), SEQ, &device);
    let teacher = CausalLm::load(&tck, &device).unwrap();
    let student = CausalLm::load(&sck, &device).unwrap();
    let batch = [3usize, 0, 4];
    let inputs: Vec<Vec<u32>> = batch.iter().map(|&i| w[i][..SEQ].to_vec()).collect();
    let tg: Vec<i64> = batch
        .iter()
        .flat_map(|&i| w[i][1..].iter().map(|&t| t as i64))
        .collect();
    for div in [
        Divergence::Fkl,
        Divergence::Rkl,
        Divergence::Jsd { beta: 0.5 },
    ] {
        let spec = LossSpec {
            divergence: Some(div),
            temperature: temp,
            kd_weight: 1.0,
            ce_weight: 0.0,
        };
        let loss = |t: Teacher| {
            let targets =
                Tensor::<1, Int>::from_data(TensorData::new(tg.clone(), [tg.len()]), &device);
            spec.compute(student.logits(&inputs, &rope), Some(t), targets, None, 1.0)
                .kd
                .unwrap()
        };
        let live = loss(Teacher::top_k_of(teacher.logits(&inputs, &rope), k, temp));
        let cached = loss(cache.teacher(&batch, &device));
        assert!(
            (live - cached).abs() < 1e-4,
            "{div:?}: live {live} cached {cached}"
        );
        // Merging tokens into one bucket can only lower a divergence.
        let full = loss(Teacher::Logits(teacher.logits(&inputs, &rope)));
        assert!(
            cached > 0.0 && cached <= full + 1e-6,
            "{div:?}: cached {cached} full {full}"
        );
    }

    // Another run's windows, temperature or vocabulary: refused with one line naming the file.
    let other = windows(6);
    let e = cache
        .check_run(&path, &other, 300, temp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cache.bin") && e.contains("windows"), "{e}");
    let mut w2 = w.clone();
    w2[1][3] ^= 1;
    let e = cache
        .check_run(&path, &w2, 300, temp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other tokens"), "{e}");
    let e = cache
        .check_run(&path, &w, 300, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("temperature"), "{e}");
    let e = cache
        .check_run(&path, &w, 320, temp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary"), "{e}");

    // Damaged files: truncated, a record out of the vocabulary, a header that lies.
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.bin");
    let check = |b: &[u8], needle: &str| {
        std::fs::write(&bad, b).unwrap();
        let e = TeacherCache::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.bin") && e.contains(needle), "{needle}: {e}");
    };
    check(&bytes[..bytes.len() - 8], "header implies");
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    let mut b = bytes.clone();
    b[nl + 1..nl + 5].copy_from_slice(&9999u32.to_le_bytes());
    check(&b, "out of range");
    let mut b = bytes.clone();
    b[nl + 5..nl + 9].copy_from_slice(&f32::NAN.to_le_bytes());
    check(&b, "log-probability");
    let text =
        String::from_utf8_lossy(&bytes[..nl]).replace("\"windows\":5", "\"windows\":500000000000");
    let mut b = text.into_bytes();
    b.extend_from_slice(&bytes[nl..]);
    check(&b, "header implies");
    check(b"not a cache", "no header");
}
