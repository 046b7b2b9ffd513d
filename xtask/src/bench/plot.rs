//! PNG plots with plotters: throughput by write size per set-up, latency
//! percentiles per set-up. Text is drawn with DejaVu Sans from Debian's
//! fonts-dejavu-core (installed by `cargo xtask setup`).
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{report::Results, size_label};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("{FONT}: {e} (apt-get install fonts-dejavu-core)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(0x44, 0x44, 0x44),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    C[i % C.len()]
}

/// Lines with min–max whiskers over categories, one series per set-up.
fn categories(
    r: &Results,
    path: &Path,
    title: &str,
    y_label: &str,
    cats: &[(String, String)],
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut y_max: f64 = 0.0;
    for s in &r.setups {
        for (_, m) in cats {
            if let Some(x) = r.summary.get(*s).and_then(|v| v.get(m)) {
                y_max = y_max.max(x.max);
            }
        }
    }
    let n = cats.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..(y_max * 1.1).max(1e-9))?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 && i < n {
                cats[i].0.clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .draw()?;
    let k = r.setups.len().max(1) as f64;
    for (si, s) in r.setups.iter().enumerate() {
        let c = colour(si);
        // Spread series sideways a little so whiskers do not overlap.
        let dx = (si as f64 - (k - 1.0) / 2.0) * 0.08;
        let pts: Vec<(f64, f64, f64, f64)> = cats
            .iter()
            .enumerate()
            .filter_map(|(i, (_, m))| {
                let x = r.summary.get(*s)?.get(m)?;
                Some((i as f64 + dx, x.median, x.min, x.max))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))?
            .label(*s)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))?;
        chart.draw_series(
            pts.iter()
                .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, c.stroke_width(1), 8)),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn throughput(r: &Results, path: &Path) -> Result<()> {
    let cats: Vec<(String, String)> = r
        .sizes
        .iter()
        .map(|s| (size_label(*s), format!("throughput/{}", size_label(*s))))
        .collect();
    categories(
        r,
        path,
        "iperf3 throughput by write size (median, min–max)",
        "Gbit/s",
        &cats,
    )
}

pub fn latency(r: &Results, path: &Path) -> Result<()> {
    let cats: Vec<(String, String)> = ["avg", "p50", "p90", "p99", "p99.9"]
        .iter()
        .map(|k| (k.to_string(), format!("latency/{k}")))
        .collect();
    categories(
        r,
        path,
        "sockperf ping-pong latency, 64 B (median, min–max)",
        "µs",
        &cats,
    )
}

#[cfg(test)]
mod tests {
    use super::{super::*, *};

    #[test]
    fn plots_are_written_and_not_empty() {
        let mut samples = Vec::new();
        for rep in 1..=3 {
            for (i, s) in ["base", "proxy", "proxy+accel"].into_iter().enumerate() {
                for size in SIZES_FULL {
                    samples.push(Sample {
                        setup: s,
                        rep,
                        metric: format!("throughput/{}", size_label(size)),
                        unit: "Gbit/s",
                        value: (size as f64).log2() + i as f64 + rep as f64 * 0.1,
                    });
                }
                for (k, v) in [
                    ("avg", 20.0),
                    ("p50", 19.0),
                    ("p90", 25.0),
                    ("p99", 30.0),
                    ("p99.9", 40.0),
                ] {
                    samples.push(Sample {
                        setup: s,
                        rep,
                        metric: format!("latency/{k}"),
                        unit: "µs",
                        value: v * (1.0 + i as f64 * 0.3),
                    });
                }
            }
        }
        let r = report::Results::new(
            serde_json::json!({}),
            &[Setup::Base, Setup::Proxy, Setup::ProxyAccel],
            &SIZES_FULL,
            3,
            1,
            samples,
        );
        let dir = std::env::temp_dir().join(format!("tproxy-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, f) in [("t.png", throughput as fn(&_, &_) -> _), ("l.png", latency)] {
            let p = dir.join(name);
            f(&r, &p).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert!(bytes.len() > 10_000, "{name}: {} bytes", bytes.len());
            assert_eq!(&bytes[1..4], b"PNG");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
