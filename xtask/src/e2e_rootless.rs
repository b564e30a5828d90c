//! placeholder
pub fn run(_args: &[String]) -> Result<(), String> {
    let u = crate::testuser::ensure_test_user()?;
    println!("{u:?}");
    Ok(())
}
