//! Benchmark (not a test): this CPU's peak f32 multiply-add rate, the ceiling no matrix product
//! and so no training step can pass on it.
//!
//! cargo bench --bench cpu_peak -- [--threads N] [--json]
//!
//! Each of N threads (default: all) runs 12 independent chains of fused multiply-adds on full
//! vector registers (AVX-512 where the CPU has it, else AVX2 + FMA), enough in flight to cover
//! the instruction's latency on both FMA ports; nothing is loaded from memory. GFLOP/s counts a
//! multiply-add as 2 flops, as GEMM rates do. The best of 5 runs is printed: the peak, which
//! noise on a shared VM can only lower. `scripts/bench_gemm_floor.py --peak` turns it into the
//! fastest step a model's FLOPs allow.

use std::time::Instant;

/// Multiply-adds each chain runs per thread and run: about 0.4 s at 100 GFLOP/s per core.
const ITERS: u64 = 200_000_000;
const CHAINS: usize = 12;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut threads = std::thread::available_parallelism()?.get();
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--threads" => {
                threads = args
                    .get(i + 1)
                    .ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?
                    .parse()?;
                i += 1;
            }
            "--json" => json = true,
            other => anyhow::bail!("unknown argument {other:?} (expected --threads N, --json)"),
        }
        i += 1;
    }
    anyhow::ensure!(threads > 0, "--threads must be at least 1");
    let Some(kernel) = Kernel::detect() else {
        anyhow::bail!("no AVX2 + FMA on this CPU: the peak bench needs x86-64 with them");
    };
    let best = (0..5).map(|_| run(kernel, threads)).fold(0.0f64, f64::max);
    if json {
        println!(
            "{}",
            serde_json::json!({"threads": threads, "isa": kernel.name(), "peak_gflops": best})
        );
    } else {
        println!(
            "threads {threads}, {}: peak {best:.1} GFLOP/s ({:.1} per thread)",
            kernel.name(),
            best / threads as f64
        );
    }
    Ok(())
}

/// GFLOP/s of `threads` threads each running the kernel's chains once.
fn run(kernel: Kernel, threads: usize) -> f64 {
    let start = Instant::now();
    let sinks: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || kernel.chains(1.0 + t as f32 * 1e-3)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    // The chains' sums are used, so the loop cannot be optimized away.
    assert!(sinks.iter().all(|s| s.is_finite()));
    let flops = threads as f64 * ITERS as f64 * CHAINS as f64 * kernel.lanes() as f64 * 2.0;
    flops / seconds / 1e9
}

#[derive(Clone, Copy)]
enum Kernel {
    Avx512,
    Avx2,
}

impl Kernel {
    fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(Kernel::Avx2);
            }
        }
        None
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "AVX-512",
            Kernel::Avx2 => "AVX2 + FMA",
        }
    }

    fn lanes(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 => 8,
        }
    }

    fn chains(self, seed: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` chose this kernel only where the CPU has its instructions.
        unsafe {
            match self {
                Kernel::Avx512 => x86::chains_avx512(seed),
                Kernel::Avx2 => x86::chains_avx2(seed),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = seed;
            unreachable!("detect finds no kernel off x86-64")
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, ITERS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_avx2(seed: f32) -> f32 {
        let (b, c) = (_mm256_set1_ps(0.999_999_9), _mm256_set1_ps(1e-7));
        let mut acc: [__m256; CHAINS] =
            std::array::from_fn(|i| _mm256_set1_ps(seed + i as f32 * 0.01));
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let mut lanes = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_avx512(seed: f32) -> f32 {
        let (b, c) = (_mm512_set1_ps(0.999_999_9), _mm512_set1_ps(1e-7));
        let mut acc: [__m512; CHAINS] =
            std::array::from_fn(|i| _mm512_set1_ps(seed + i as f32 * 0.01));
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
        _mm512_reduce_add_ps(sum)
    }
}
