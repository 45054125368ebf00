//! Download progress: on a terminal, a bar per file and one for the whole model (bytes, rate, ETA); elsewhere
//! (a pod's log), a line when each file starts and ends and a summary line every [`LOG_EVERY`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain log reports overall progress.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

const FILE_TEMPLATE: &str = "{msg:>32} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}";
const TOTAL_TEMPLATE: &str =
    "{msg:>32} [{bar:30.cyan}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta_precise}";

/// Progress of one model's download, shared by its files' [`FileProgress`] handles.
#[derive(Debug)]
pub struct Reporter {
    model: String,
    total: u64,
    done: Arc<AtomicU64>,
    started: Instant,
    bars: Option<(MultiProgress, ProgressBar)>,
    logger: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    /// `total` bytes to download for `model`; bars on a terminal, else periodic log lines.
    pub fn start(model: String, total: u64, bars: bool) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        if bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall =
                multi.add(ProgressBar::new(total).with_style(style(TOTAL_TEMPLATE)).with_message(model.clone()));
            return Self { model, total, done, started, bars: Some((multi, overall)), logger: None };
        }
        tracing::info!(model, bytes = total, size = %human(total), "downloading");
        let (name, counter) = (model.clone(), done.clone());
        let logger = tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                tracing::info!(model = name, "{}", summary(counter.load(Ordering::Relaxed), total, started.elapsed()));
            }
        });
        Self { model, total, done, started, bars: None, logger: Some(logger) }
    }

    /// A handle for one file's download (hf-hub clones it into each ranged request).
    pub fn file(&self) -> FileProgress {
        FileProgress {
            done: self.done.clone(),
            bars: self.bars.clone(),
            bar: None,
            name: String::new(),
            size: 0,
            started: Instant::now(),
        }
    }

    /// Ends the report with a line for the whole download.
    pub fn finish(mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
        if let Some((_, overall)) = self.bars.take() {
            overall.finish_and_clear();
        }
        let done = self.done.load(Ordering::Relaxed);
        tracing::info!(model = self.model, "downloaded: {}", summary(done, self.total, self.started.elapsed()));
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
        if let Some((_, overall)) = self.bars.take() {
            overall.abandon();
        }
    }
}

/// One file's progress: its own bar on a terminal; the shared byte count either way.
#[derive(Debug, Clone)]
pub struct FileProgress {
    done: Arc<AtomicU64>,
    bars: Option<(MultiProgress, ProgressBar)>,
    bar: Option<ProgressBar>,
    name: String,
    size: u64,
    started: Instant,
}

impl hf_hub::api::tokio::Progress for FileProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        self.size = size as u64;
        self.name = filename.to_string();
        self.started = Instant::now();
        match &self.bars {
            Some((multi, overall)) => {
                let bar = ProgressBar::new(self.size).with_style(style(FILE_TEMPLATE)).with_message(short(filename));
                self.bar = Some(multi.insert_before(overall, bar));
            }
            None => tracing::info!(file = filename, size = %human(self.size), "downloading"),
        }
    }

    async fn update(&mut self, size: usize) {
        let size = size as u64;
        self.done.fetch_add(size, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(size);
        }
        if let Some((_, overall)) = &self.bars {
            overall.inc(size);
        }
    }

    async fn finish(&mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish_and_clear(),
            None => tracing::info!(
                file = self.name,
                size = %human(self.size),
                seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()),
                "downloaded"
            ),
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// The last 32 characters of a file name.
fn short(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    match chars.len() {
        n if n > 32 => format!("…{}", chars[n - 31..].iter().collect::<String>()),
        _ => name.to_string(),
    }
}

/// `1.5 GiB of 40.0 GiB (3.7%), 120.0 MiB/s, ETA 5m 20s`.
pub fn summary(done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let percent = if total == 0 { 100.0 } else { 100.0 * done as f64 / total as f64 };
    let eta = match total.saturating_sub(done) {
        0 => "0s".to_string(),
        _ if rate <= 0.0 => "unknown".to_string(),
        left => duration((left as f64 / rate) as u64),
    };
    format!("{} of {} ({percent:.1}%), {}/s, ETA {eta}", human(done), human(total), human(rate as u64))
}

fn duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Bytes in binary units, one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_like_a_progress_line() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(
            summary(1 << 30, 4 << 30, Duration::from_secs(8)),
            "1.0 GiB of 4.0 GiB (25.0%), 128.0 MiB/s, ETA 24s"
        );
        assert_eq!(summary(0, 1 << 20, Duration::from_secs(1)), "0 B of 1.0 MiB (0.0%), 0 B/s, ETA unknown");
        assert_eq!(summary(5, 5, Duration::from_secs(1)), "5 B of 5 B (100.0%), 5 B/s, ETA 0s");
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(short("model-00001-of-000163.safetensors"), "…del-00001-of-000163.safetensors");
    }
}
