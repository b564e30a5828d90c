//! Go's `%q` quoting, so that our error texts match podman's byte for byte.

use std::fmt::Write;

/// Quote `s` the way Go's `strconv.Quote` (and so `fmt`'s `%q`) does.
///
/// Printable ASCII is exact; for other characters we follow Go's rules with an
/// approximation of `unicode.IsPrint` (controls, non-ASCII spaces and the common format
/// characters are escaped).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_go_printable(c) => out.push(c),
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

fn is_go_printable(c: char) -> bool {
    // Go's IsPrint: letters, marks, numbers, punctuation, symbols and U+0020 only.
    let format_or_private = matches!(c as u32,
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f
        | 0x2028..=0x202e | 0x2060..=0x206f | 0xfeff | 0xfff9..=0xfffb
        | 0xe000..=0xf8ff | 0xf0000..=0x10ffff);
    !c.is_control() && !c.is_whitespace() && !format_or_private
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn matches_go() {
        let cases = [
            ("", r#""""#),
            ("abc", r#""abc""#),
            ("a b=c,d", r#""a b=c,d""#),
            ("say \"hi\"", r#""say \"hi\"""#),
            ("back\\slash", r#""back\\slash""#),
            ("tab\there\n", r#""tab\there\n""#),
            ("\u{0}\u{1}\u{7f}", r#""\x00\x01\x7f""#),
            ("\u{7}\u{8}\u{b}\u{c}\r", r#""\a\b\v\f\r""#),
            ("héllo", "\"héllo\""),
            ("nb\u{a0}sp", r#""nb\u00a0sp""#),
            ("zw\u{200b}", r#""zw\u200b""#),
            ("\u{feff}", r#""\ufeff""#),
            ("\u{10ffff}", r#""\U0010ffff""#),
            ("日本", "\"日本\""),
        ];
        for (input, want) in cases {
            assert_eq!(go_quote(input), want, "input {input:?}");
        }
    }
}
