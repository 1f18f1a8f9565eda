//! The suite's chart: a PNG drawn with `plotters` on its bitmap backend,
//! with the DejaVu Sans font embedded in the binary, so it renders on a
//! machine with no fonts or fontconfig installed.
//!
//! Top: QD64 IOPS per job (groups), one bar per setup. Bottom: QD1 average
//! read latency per setup.

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::{Job, SuiteReport};

const FONT: &str = "sans-serif";

fn register() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow!("the embedded font does not parse"));
    });
    res
}

/// Draws the chart of `report` into `path` (PNG).
pub fn draw(report: &SuiteReport, path: &Path) -> anyhow::Result<()> {
    register()?;
    let setups: Vec<&str> = report.setups.iter().map(|(s, _)| s.as_str()).collect();
    let jobs = [Job::RandRead, Job::RandWrite, Job::RandRw];
    let value = |setup: &str, job: Job| {
        report
            .rows
            .iter()
            .find(|r| r.setup == setup && r.job == job.label())
            .map(|r| r.median.total.clone())
    };

    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(600);
    let title = format!(
        "Cairn suite ({} mode, medians of {} round(s)): 4 KiB, QD{} x {}",
        if report.options.quick {
            "quick"
        } else {
            "full"
        },
        report.options.rounds,
        report.options.iodepth,
        report.options.numjobs
    );

    // Top: kIOPS per job and setup.
    let kiops: Vec<Vec<f64>> = setups
        .iter()
        .map(|s| {
            jobs.iter()
                .map(|&j| value(s, j).map_or(0.0, |t| t.iops / 1e3))
                .collect()
        })
        .collect();
    let max = kiops
        .iter()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.18;
    let ngroups = jobs.len();
    let mut chart = ChartBuilder::on(&top)
        .caption(&title, (FONT, 24))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(ngroups as f64 - 0.5), 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(ngroups)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                jobs.get(i as usize).map_or_else(String::new, |j| {
                    format!("{} (QD{})", j.label(), report.options.iodepth)
                })
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("thousand IOPS")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    let n = setups.len().max(1) as f64;
    let width = 0.84 / n;
    for (si, name) in setups.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let bars: Vec<(f64, f64)> = (0..ngroups)
            .map(|g| (g as f64 - 0.42 + si as f64 * width, kiops[si][g]))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x0, v)| {
                Rectangle::new(
                    [(x0 + width * 0.08, 0.0), (x0 + width * 0.92, v)],
                    color.filled(),
                )
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(bars.iter().filter(|(_, v)| *v > 0.0).map(|&(x0, v)| {
            Text::new(
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                },
                (x0 + width * 0.5, v + max * 0.012),
                (FONT, 11)
                    .into_font()
                    .color(&BLACK)
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    )),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;

    // Bottom: QD1 average latency per setup.
    let lat: Vec<f64> = setups
        .iter()
        .map(|s| value(s, Job::Qd1Read).map_or(0.0, |t| t.latency.mean_us))
        .collect();
    let lmax = lat.iter().copied().fold(0.0, f64::max).max(1e-3) * 1.2;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("4 KiB random read at QD1: average latency", (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(setups.len() as f64 - 0.5), 0f64..lmax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(setups.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                setups
                    .get(i as usize)
                    .map_or_else(String::new, |s| s.to_string())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("µs")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    for (si, &v) in lat.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let x = si as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x - 0.35, 0.0), (x + 0.35, v)],
            color.filled(),
        )))?;
        if v > 0.0 {
            chart.draw_series(std::iter::once(Text::new(
                format!("{v:.1}"),
                (x, v + lmax * 0.012),
                (FONT, 12)
                    .into_font()
                    .color(&BLACK)
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    )),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}
