//! Wall-clock time for events: kernel timestamps are CLOCK_MONOTONIC; events carry RFC 3339 UTC
//! with nanoseconds.

/// Converts CLOCK_MONOTONIC nanoseconds to Unix-epoch nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime − monotonic, in ns, measured at calibration.
    offset_ns: i128,
}

impl Clock {
    /// Measures the offset between the two clocks now. Recalibrate periodically: NTP may step or
    /// slew the realtime clock.
    pub fn calibrate() -> Self {
        let mono = monotonic_ns();
        let real = realtime_ns();
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
        }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns).max(0) as u64
    }

    pub fn rfc3339(&self, monotonic_ns: u64) -> String {
        rfc3339_ns(self.to_unix_ns(monotonic_ns))
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// `2026-11-27T20:47:14.123456789Z`. Written digit by digit: it runs for every event.
pub fn rfc3339_ns(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    put_digits(&mut text[0..4], year.clamp(0, 9999) as u64);
    put_digits(&mut text[5..7], u64::from(month));
    put_digits(&mut text[8..10], u64::from(day));
    put_digits(&mut text[11..13], rem / 3600);
    put_digits(&mut text[14..16], rem % 3600 / 60);
    put_digits(&mut text[17..19], rem % 60);
    put_digits(&mut text[20..29], unix_ns % 1_000_000_000);
    String::from_utf8(text.to_vec()).expect("ASCII digits")
}

/// Writes `value` right-aligned in `out` as zero-padded decimal digits.
fn put_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (leap day) 12:34:56.000000789
        assert_eq!(
            rfc3339_ns(951_827_696_000_000_789),
            "2000-02-29T12:34:56.000000789Z"
        );
        assert_eq!(
            rfc3339_ns(1_795_812_434_123_456_789),
            "2026-11-27T20:47:14.123456789Z"
        );
        assert_eq!(
            rfc3339_ns(4_102_444_800_000_000_000),
            "2100-01-01T00:00:00.000000000Z"
        );
    }

    #[test]
    fn converts_monotonic_to_wall() {
        let clock = Clock::with_offset(1_000);
        assert_eq!(clock.to_unix_ns(5), 1_005);
        assert_eq!(Clock::with_offset(-10).to_unix_ns(5), 0);
    }

    #[test]
    fn calibration_tracks_the_realtime_clock() {
        let clock = Clock::calibrate();
        let wall = clock.to_unix_ns(monotonic_ns());
        assert!(wall.abs_diff(realtime_ns()) < 1_000_000_000);
    }
}
