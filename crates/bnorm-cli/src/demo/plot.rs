//! The demo's PNG: training loss per epoch and test accuracy per epoch (inference mode
//! versus training mode) on top; below, the answer — test accuracy of the trained network
//! by what batch norm normalizes with, one bar per row of the printed table.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// DejaVu Sans Mono (see assets/DejaVu-LICENSE.txt), embedded so text renders on machines
/// without fonts.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// Canvas size in pixels: the two curve panels side by side, the bar chart below them.
pub const SIZE: (u32, u32) = (1100, 820);
/// Height of the curve panels; the bar chart gets the rest.
const CURVES_HEIGHT: u32 = 440;

/// The five rows of the experiment in the printed table's order: the key of each in the
/// report's `accuracy` object, and its bar's label.
pub const COMPARISON: [(&str, &str); 5] = [
    ("running", "running stats (inference)"),
    ("batch1_train", "batch of 1 (train mode)"),
    ("full_batch_train", "whole test set (train mode)"),
    ("never_updated", "never updated"),
    ("recalibrated", "recalibrated"),
];

/// Row 1 — the right way — and the curves of inference mode.
const RIGHT_WAY: RGBColor = RGBColor(0, 150, 60);
/// Every other row of the comparison.
const OTHER_WAY: RGBColor = RGBColor(120, 130, 150);

/// One bar of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: &'static str,
    /// Test accuracy as a fraction; `None` where that way of normalizing was refused.
    pub accuracy: Option<f64>,
}

/// The bars of the comparison from the report's `accuracy` object, in table order. A null
/// accuracy (refused) becomes a bar without a value; a missing or non-numeric one is an
/// error, so a renamed report key cannot silently drop a bar.
pub fn bars(accuracy: &Value) -> Result<Vec<Bar>> {
    COMPARISON
        .iter()
        .map(|&(key, label)| {
            let accuracy = match accuracy.get(key) {
                Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_f64()
                        .with_context(|| format!("accuracy.{key} is not a number: {v}"))?,
                ),
                None => bail!("the report has no accuracy.{key}"),
            };
            Ok(Bar { label, accuracy })
        })
        .collect()
}

fn series(epochs: &[Value], key: &str) -> Vec<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|e| Some((e["epoch"].as_f64()?, e[key].as_f64()?)))
        .collect()
}

/// How many epoch labels the curve panels ask for: as many as epochs (up to 15), so that
/// every label falls on a whole epoch.
fn epoch_labels(epochs: &[Value]) -> usize {
    epochs.len().clamp(2, 15)
}

/// Draws the plot into `path` (through a temporary file and a rename).
pub fn write(path: &Path, epochs: &[Value], bars: &[Bar]) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("embedded font is invalid"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = dir.join(format!(".bnorm-plot-{}.png", std::process::id()));
    if let Err(e) = draw(&tmp, epochs, bars) {
        std::fs::remove_file(&tmp).ok();
        bail!("drawing the plot: {e}");
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, epochs: &[Value], bars: &[Bar]) -> DrawResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (curves, comparison) = root.split_vertically(CURVES_HEIGHT);
    let (left, right) = curves.split_horizontally(SIZE.0 / 2);
    loss_panel(&left, epochs)?;
    accuracy_panel(&right, epochs)?;
    comparison_panel(&comparison, bars)?;
    root.present()?;
    Ok(())
}

/// Training loss per epoch.
fn loss_panel(area: &Area, epochs: &[Value]) -> DrawResult {
    let n = epochs.len().max(2) as f64;
    let loss = series(epochs, "loss");
    let max_loss = loss.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("training loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1.0..n, 0.0..max_loss)?;
    chart
        .configure_mesh()
        .x_labels(epoch_labels(epochs))
        .x_desc("epoch")
        .y_desc("cross-entropy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(loss.clone(), BLUE.stroke_width(2)))?
        .label("loss (training batches)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(loss.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// Test accuracy per epoch, inference mode versus training mode.
fn accuracy_panel(area: &Area, epochs: &[Value]) -> DrawResult {
    let n = epochs.len().max(2) as f64;
    let inf = series(epochs, "test_accuracy_inference");
    let trn = series(epochs, "test_accuracy_train_mode");
    let lo = inf.iter().chain(&trn).map(|p| p.1).fold(1.0f64, f64::min);
    let lo = (lo - 0.05).clamp(0.0, 0.9);
    let mut chart = ChartBuilder::on(area)
        .caption("test accuracy", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1.0..n, lo..1.0)?;
    chart
        .configure_mesh()
        .x_labels(epoch_labels(epochs))
        .x_desc("epoch")
        .y_desc("accuracy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(inf.clone(), RIGHT_WAY.stroke_width(2)))?
        .label("inference mode (running statistics)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RIGHT_WAY.stroke_width(2)));
    chart.draw_series(inf.iter().map(|&p| Circle::new(p, 3, RIGHT_WAY.filled())))?;
    chart
        .draw_series(LineSeries::new(trn.clone(), RED.stroke_width(2)))?
        .label("training mode (batch statistics)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(trn.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

/// The five-way comparison as horizontal bars, first row on top, 0–100 %; the right way
/// (row 1) in green, each bar's accuracy printed on it (or beside it when the bar is short).
fn comparison_panel(area: &Area, bars: &[Bar]) -> DrawResult {
    let n = bars.len();
    if n == 0 {
        return Ok(());
    }
    // Segment i from the bottom holds bar n-1-i, so the table's first row is on top.
    let bar_at = |i: usize| n - 1 - i;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Test accuracy by what batch norm normalizes with (green: the right way)",
            ("sans-serif", 22),
        )
        .margin(12)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(290)
        // An integer range includes its end: 0..n-1 is n segments.
        .build_cartesian_2d(0.0..100.0, (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .y_labels(n)
        .x_labels(11)
        .x_desc("test accuracy")
        .x_label_formatter(&|v| format!("{v:.0}%"))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => bars[bar_at(*i)].label.to_string(),
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 17))
        .draw()?;
    chart.draw_series((0..n).map(|i| {
        let (bar, color) = (
            &bars[bar_at(i)],
            if bar_at(i) == 0 { RIGHT_WAY } else { OTHER_WAY },
        );
        let end = bar.accuracy.unwrap_or(0.0) * 100.0;
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (end, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        r.set_margin(8, 8, 0, 0);
        r
    }))?;
    chart.draw_series((0..n).map(|i| {
        let bar = &bars[bar_at(i)];
        let font = ("sans-serif", 18).into_font();
        let (text, x, style) = match bar.accuracy {
            // Inside the bar's end, white, when it is long enough to hold the text.
            Some(a) if a >= 0.2 => (
                format!("{:.1}%", a * 100.0),
                a * 100.0 - 1.0,
                font.color(&WHITE).pos(Pos::new(HPos::Right, VPos::Center)),
            ),
            Some(a) => (
                format!("{:.1}%", a * 100.0),
                a * 100.0 + 1.0,
                font.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
            ),
            None => (
                "refused".to_string(),
                1.0,
                font.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
            ),
        };
        Text::new(text, (x, SegmentValue::CenterOf(i)), style)
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bars_follow_the_table_order_and_the_reports_numbers() {
        let accuracy = json!({
            "running": 0.971,
            "batch1_train": 0.123,
            "full_batch_train": 0.965,
            "never_updated": 0.402,
            "recalibrated": 0.974,
        });
        let b = bars(&accuracy).unwrap();
        let labels: Vec<&str> = b.iter().map(|b| b.label).collect();
        assert_eq!(
            labels,
            [
                "running stats (inference)",
                "batch of 1 (train mode)",
                "whole test set (train mode)",
                "never updated",
                "recalibrated",
            ]
        );
        let values: Vec<Option<f64>> = b.iter().map(|b| b.accuracy).collect();
        assert_eq!(
            values,
            [
                Some(0.971),
                Some(0.123),
                Some(0.965),
                Some(0.402),
                Some(0.974)
            ]
        );
    }

    #[test]
    fn a_refused_row_is_a_bar_without_value_and_a_missing_key_an_error() {
        let mut accuracy = json!({
            "running": 0.9,
            "batch1_train": null,
            "full_batch_train": 0.8,
            "never_updated": 0.1,
            "recalibrated": 0.95,
        });
        assert_eq!(bars(&accuracy).unwrap()[1].accuracy, None);
        accuracy.as_object_mut().unwrap().remove("recalibrated");
        let e = bars(&accuracy).unwrap_err().to_string();
        assert!(e.contains("accuracy.recalibrated"), "{e}");
        accuracy["recalibrated"] = json!("high");
        assert!(bars(&accuracy).is_err());
    }

    #[test]
    fn draws_every_kind_of_bar() {
        let epochs = [
            json!({"epoch": 1, "loss": 1.2, "test_accuracy_inference": 0.7, "test_accuracy_train_mode": 0.6}),
            json!({"epoch": 2, "loss": 0.5, "test_accuracy_inference": 0.9, "test_accuracy_train_mode": 0.85}),
        ];
        let b = bars(&json!({
            "running": 1.0,
            "batch1_train": 0.0,
            "full_batch_train": 0.05,
            "never_updated": null,
            "recalibrated": 0.5,
        }))
        .unwrap();
        let dir = std::env::temp_dir().join(format!("bnorm-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.png");
        write(&path, &epochs, &b).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let size = (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap()),
        );
        assert_eq!(size, SIZE);
        std::fs::remove_dir_all(&dir).ok();
    }
}
