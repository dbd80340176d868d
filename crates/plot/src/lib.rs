//! Small SVG charts for refusal-steer's reports: lines, overlaid histograms, scatter plots and
//! grouped bars.
//!
//! Charts are drawn with plotters' SVG backend only, so no system fonts or font files are
//! needed: text is written as SVG `<text>` and rendered by whatever opens the file. Every
//! function checks its input first and returns a [`PlotError`] (never panics) for empty or
//! non-finite data.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use thiserror::Error;

/// Pixel size of every chart.
const SIZE: (u32, u32) = (900, 540);
const LABEL_FONT: (&str, u32) = ("sans-serif", 15);
/// Distinguishable colours (matplotlib's "tab10"), cycled when there are more series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Title and axis labels of a chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
}

impl Chart {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
        }
    }
}

/// One named line of `(x, y)` points, drawn in the given order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("{}: nothing to plot ({what}); pass at least one value", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}: series {series:?} has the non-finite value {value} at index {index}; drop NaN/Inf values before plotting", path.display())]
    NonFinite {
        path: PathBuf,
        series: String,
        index: usize,
        value: f64,
    },
    #[error("{}: series {series:?} has {found} values for {expected} labels; pass one value per label", path.display())]
    LengthMismatch {
        path: PathBuf,
        series: String,
        found: usize,
        expected: usize,
    },
    #[error("{}: a histogram needs at least 1 bin and a finite range low < high, got {bins} bins over {low}..{high}", path.display())]
    BadBins {
        path: PathBuf,
        bins: usize,
        low: f64,
        high: f64,
    },
    #[error("{}: drawing failed: {detail}", path.display())]
    Draw { path: PathBuf, detail: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, PlotError>;

/// Lines with a marker at each point and a legend naming each series.
pub fn lines(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    for s in series {
        check_points(path, &s.name, &s.points)?;
    }
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (x_range, y_range) = bounds(path, all.iter().copied())?;
    let corner = emptiest_corner(&all, &x_range, &y_range);
    render(path, |root| {
        let mut plot = cartesian(root, chart, x_range, y_range)?;
        for (i, s) in series.iter().enumerate() {
            let style = colour(i).stroke_width(2);
            plot.draw_series(LineSeries::new(s.points.iter().copied(), style))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
            plot.draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, colour(i).filled())),
            )?;
        }
        legend(&mut plot, corner)
    })
}

/// Overlaid, semi-transparent histograms of each group over `range`, in `bins` equal bins.
/// Values outside `range` are left out.
pub fn histogram(
    path: &Path,
    chart: &Chart,
    groups: &[(String, Vec<f64>)],
    bins: usize,
    range: (f64, f64),
) -> Result<()> {
    let (low, high) = range;
    if bins == 0 || !(low.is_finite() && high.is_finite() && low < high) {
        return Err(PlotError::BadBins {
            path: path.to_path_buf(),
            bins,
            low,
            high,
        });
    }
    for (name, values) in groups {
        check_values(path, name, values)?;
    }
    if groups.iter().all(|(_, values)| values.is_empty()) {
        return Err(empty(path, "every histogram group is empty"));
    }
    let width = (high - low) / bins as f64;
    let counts: Vec<Vec<usize>> = groups
        .iter()
        .map(|(_, values)| {
            let mut count = vec![0; bins];
            for &v in values.iter().filter(|v| (low..=high).contains(*v)) {
                // `high` itself falls in the last bin.
                count[(((v - low) / width) as usize).min(bins - 1)] += 1;
            }
            count
        })
        .collect();
    let tallest = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    render(path, |root| {
        let mut plot = cartesian(root, chart, low..high, 0.0..tallest as f64 * 1.1)?;
        for (i, ((name, _), count)) in groups.iter().zip(&counts).enumerate() {
            let fill = colour(i).mix(0.4).filled();
            plot.draw_series(count.iter().enumerate().map(|(b, &n)| {
                let left = low + b as f64 * width;
                Rectangle::new([(left, 0.0), (left + width, n as f64)], fill)
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill));
        }
        legend(&mut plot, SeriesLabelPosition::UpperRight)
    })
}

/// One colour of points per group, with a legend.
pub fn scatter(path: &Path, chart: &Chart, groups: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    for (name, points) in groups {
        check_points(path, name, points)?;
    }
    let all: Vec<(f64, f64)> = groups
        .iter()
        .flat_map(|(_, points)| points.iter().copied())
        .collect();
    let (x_range, y_range) = bounds(path, all.iter().copied())?;
    let corner = emptiest_corner(&all, &x_range, &y_range);
    render(path, |root| {
        let mut plot = cartesian(root, chart, x_range, y_range)?;
        for (i, (name, points)) in groups.iter().enumerate() {
            let fill = colour(i).mix(0.7).filled();
            plot.draw_series(points.iter().map(|&p| Circle::new(p, 3, fill)))?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 6, y), 3, fill));
        }
        legend(&mut plot, corner)
    })
}

/// Grouped bars: one group per label, one bar per series in each group.
pub fn bars(
    path: &Path,
    chart: &Chart,
    labels: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    if labels.is_empty() || series.is_empty() {
        return Err(empty(path, "bars need at least one label and one series"));
    }
    for (name, values) in series {
        if values.len() != labels.len() {
            return Err(PlotError::LengthMismatch {
                path: path.to_path_buf(),
                series: name.clone(),
                found: values.len(),
                expected: labels.len(),
            });
        }
        check_values(path, name, values)?;
    }
    // Bars grow from 0, so 0 is always on the axis.
    let values = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (low, high) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y_range = padded(low, high);
    let group_width = 0.8;
    let bar_width = group_width / series.len() as f64;
    let x_range = -0.5..labels.len() as f64 - 0.5;
    let label_at = |x: &f64| {
        let nearest = x.round();
        match labels.get(nearest as usize) {
            // Only whole positions are groups; plotters may also ask for ticks in between.
            Some(label) if (x - nearest).abs() < 1e-6 && nearest >= 0.0 => label.clone(),
            _ => String::new(),
        }
    };
    render(path, |root| {
        let mut plot = ChartBuilder::on(root)
            .caption(&chart.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range, y_range)?;
        plot.configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .label_style(LABEL_FONT)
            .axis_desc_style(LABEL_FONT)
            .x_labels(labels.len() + 1)
            .x_label_formatter(&label_at)
            .y_label_formatter(&tick_label)
            .disable_x_mesh()
            .draw()?;
        for (i, (name, values)) in series.iter().enumerate() {
            let fill = colour(i).filled();
            plot.draw_series(values.iter().enumerate().map(|(group, &v)| {
                let left = group as f64 - group_width / 2.0 + i as f64 * bar_width;
                Rectangle::new([(left, 0.0), (left + bar_width, v)], fill)
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill));
        }
        legend(&mut plot, SeriesLabelPosition::UpperRight)
    })
}

type Plot<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type DrawResult<T> = std::result::Result<
    T,
    DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>,
>;

/// Draws into an in-memory SVG, then writes it, so a failure never leaves half a file.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> DrawResult<()>,
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|_| draw(&root))
            .and_then(|_| root.present())
            .map_err(|e| PlotError::Draw {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
    }
    std::fs::write(path, svg).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn cartesian<'a>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    chart: &Chart,
    x_range: Range<f64>,
    y_range: Range<f64>,
) -> DrawResult<Plot<'a>> {
    let mut plot = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)?;
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(LABEL_FONT)
        .axis_desc_style(LABEL_FONT)
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .draw()?;
    Ok(plot)
}

fn legend(plot: &mut Plot<'_>, corner: SeriesLabelPosition) -> DrawResult<()> {
    plot.configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(LABEL_FONT)
        .draw()
}

/// The corner whose box (the outer 40% of the width, 30% of the height) holds the fewest
/// points, so the legend hides as little data as possible.
fn emptiest_corner(
    points: &[(f64, f64)],
    x_range: &Range<f64>,
    y_range: &Range<f64>,
) -> SeriesLabelPosition {
    let fraction = |v: f64, r: &Range<f64>| (v - r.start) / (r.end - r.start);
    let count = |right: bool, top: bool| {
        points
            .iter()
            .filter(|&&(x, y)| {
                let (fx, fy) = (fraction(x, x_range), fraction(y, y_range));
                (if right { fx > 0.6 } else { fx < 0.4 }) && (if top { fy > 0.7 } else { fy < 0.3 })
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, count(true, true)),
        (SeriesLabelPosition::LowerRight, count(true, false)),
        (SeriesLabelPosition::UpperLeft, count(false, true)),
        (SeriesLabelPosition::LowerLeft, count(false, false)),
    ]
    .into_iter()
    .min_by_key(|&(_, n)| n)
    .map_or(SeriesLabelPosition::UpperRight, |(corner, _)| corner)
}

/// Tick text without float noise: "5" rather than "5.0", "0.3" rather than "0.30000000000000004".
fn tick_label(value: &f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

fn empty(path: &Path, what: &'static str) -> PlotError {
    PlotError::Empty {
        path: path.to_path_buf(),
        what,
    }
}

fn check_values(path: &Path, series: &str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(PlotError::NonFinite {
            path: path.to_path_buf(),
            series: series.to_string(),
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

fn check_points(path: &Path, series: &str, points: &[(f64, f64)]) -> Result<()> {
    match points
        .iter()
        .position(|(x, y)| !(x.is_finite() && y.is_finite()))
    {
        Some(index) => {
            let (x, y) = points[index];
            Err(PlotError::NonFinite {
                path: path.to_path_buf(),
                series: series.to_string(),
                index,
                value: if x.is_finite() { y } else { x },
            })
        }
        None => Ok(()),
    }
}

/// Axis ranges covering every (finite) point, with a margin.
fn bounds(
    path: &Path,
    points: impl Iterator<Item = (f64, f64)>,
) -> Result<(Range<f64>, Range<f64>)> {
    let mut points = points.peekable();
    if points.peek().is_none() {
        return Err(empty(path, "every series is empty"));
    }
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points {
        (x_lo, x_hi) = (x_lo.min(x), x_hi.max(x));
        (y_lo, y_hi) = (y_lo.min(y), y_hi.max(y));
    }
    Ok((padded(x_lo, x_hi), padded(y_lo, y_hi)))
}

/// `low..high` widened by 5% each side; a single value gets a unit-wide range around it.
fn padded(low: f64, high: f64) -> Range<f64> {
    let span = high - low;
    if span > 0.0 {
        low - 0.05 * span..high + 0.05 * span
    } else {
        low - 0.5..high + 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart::new("Held-out AUC <by layer>", "layer", "AUC")
    }

    /// Reads the file back and checks it is one SVG document naming the title and every series.
    fn assert_svg(path: &Path, names: &[&str]) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.trim_start().starts_with("<svg"), "{text:.200}");
        assert!(text.trim_end().ends_with("</svg>"));
        assert!(
            text.contains("Held-out AUC &lt;by layer&gt;"),
            "title missing"
        );
        for name in names {
            assert!(text.contains(name), "series {name} missing");
        }
        assert!(!text.contains("NaN"), "a NaN coordinate reached the file");
    }

    #[test]
    fn lines_write_an_svg_with_title_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.svg");
        let series = [
            Series {
                name: "md".into(),
                points: (0..10).map(|i| (i as f64, (i as f64).sqrt())).collect(),
            },
            Series {
                name: "wrmd".into(),
                points: vec![(3.0, 0.5)],
            },
        ];
        lines(&path, &chart(), &series).unwrap();
        assert_svg(&path, &["md", "wrmd", "layer"]);
    }

    #[test]
    fn histogram_writes_overlaid_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hist.svg");
        let groups = [
            ("refusal".to_string(), vec![0.9, 0.8, 0.7, 1.0, 5.0]),
            ("compliance".to_string(), vec![-0.9, -0.2, 0.0]),
        ];
        histogram(&path, &chart(), &groups, 8, (-1.0, 1.0)).unwrap();
        assert_svg(&path, &["refusal", "compliance"]);
    }

    #[test]
    fn scatter_and_bars_write_svgs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scatter.svg");
        let groups = [
            ("refusal".to_string(), vec![(1.0, 2.0), (2.0, 3.0)]),
            ("compliance".to_string(), vec![(-1.0, -2.0)]),
        ];
        scatter(&path, &chart(), &groups).unwrap();
        assert_svg(&path, &["refusal", "compliance"]);

        let path = dir.path().join("bars.svg");
        let labels: Vec<String> = ["p1", "p2", "p3"].map(String::from).to_vec();
        let series = [
            ("norm md".to_string(), vec![1.0, 2.0, 3.0]),
            ("norm wrmd".to_string(), vec![-0.5, 0.0, 0.25]),
        ];
        bars(&path, &chart(), &labels, &series).unwrap();
        // Each group is labelled on the x axis (plotters puts text on a line of its own).
        assert_svg(&path, &["norm md", "norm wrmd", "\np2\n"]);
    }

    #[test]
    fn ticks_read_cleanly_and_the_legend_avoids_the_data() {
        assert_eq!(tick_label(&5.0), "5");
        assert_eq!(tick_label(&0.30000000000000004), "0.3");
        assert_eq!(tick_label(&-0.0001), "0");
        assert_eq!(tick_label(&-2.5), "-2.5");
        // Data rising to the upper right leaves the lower right free.
        let rising: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, i as f64)).collect();
        let corner = emptiest_corner(&rising, &(0.0..9.0), &(0.0..9.0));
        assert!(matches!(corner, SeriesLabelPosition::LowerRight));
    }

    #[test]
    fn a_single_point_still_gets_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.svg");
        let series = [Series {
            name: "only".into(),
            points: vec![(2.0, 2.0)],
        }];
        lines(&path, &chart(), &series).unwrap();
        assert_svg(&path, &["only"]);
    }

    #[test]
    fn empty_or_non_finite_input_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.svg");
        let nan_series = [Series {
            name: "broken".into(),
            points: vec![(0.0, 1.0), (1.0, f64::NAN)],
        }];
        let err = lines(&path, &chart(), &nan_series).unwrap_err();
        assert!(
            matches!(err, PlotError::NonFinite { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("broken") && err.to_string().contains("bad.svg"));
        assert!(matches!(
            lines(&path, &chart(), &[]),
            Err(PlotError::Empty { .. })
        ));
        let empty_series = [Series {
            name: "none".into(),
            points: vec![],
        }];
        assert!(matches!(
            lines(&path, &chart(), &empty_series),
            Err(PlotError::Empty { .. })
        ));
        assert!(matches!(
            scatter(&path, &chart(), &[("s".into(), vec![(f64::INFINITY, 0.0)])]),
            Err(PlotError::NonFinite { .. })
        ));
        assert!(matches!(
            histogram(&path, &chart(), &[("h".into(), vec![])], 4, (0.0, 1.0)),
            Err(PlotError::Empty { .. })
        ));
        assert!(matches!(
            histogram(
                &path,
                &chart(),
                &[("h".into(), vec![f64::NAN])],
                4,
                (0.0, 1.0)
            ),
            Err(PlotError::NonFinite { .. })
        ));
        for (bins, range) in [(0, (0.0, 1.0)), (4, (1.0, 1.0)), (4, (f64::NAN, 1.0))] {
            assert!(matches!(
                histogram(&path, &chart(), &[("h".into(), vec![0.5])], bins, range),
                Err(PlotError::BadBins { .. })
            ));
        }
        let labels = vec!["a".to_string(), "b".to_string()];
        assert!(matches!(
            bars(&path, &chart(), &labels, &[("short".into(), vec![1.0])]),
            Err(PlotError::LengthMismatch { .. })
        ));
        assert!(matches!(
            bars(
                &path,
                &chart(),
                &labels,
                &[("nan".into(), vec![1.0, f64::NAN])]
            ),
            Err(PlotError::NonFinite { .. })
        ));
        assert!(matches!(
            bars(&path, &chart(), &[], &[]),
            Err(PlotError::Empty { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn an_unwritable_path_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("x.svg");
        let series = [Series {
            name: "s".into(),
            points: vec![(0.0, 1.0)],
        }];
        let err = lines(&path, &chart(), &series).unwrap_err();
        assert!(matches!(err, PlotError::Io { .. }));
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }
}
